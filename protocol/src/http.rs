//! HTTP rules the hub and the cocoon apply the same way when proxying: which headers
//! never cross a proxy, and how a requested path is checked and normalised so that no
//! `..`, however encoded, climbs above the service's root.
//!
//! Two kinds of `..` exist. One the proxy can see: a segment between real slashes that
//! is `..` (also as `%2e%2e`); normalisation resolves it, never above `/`. The other is
//! hidden from the proxy and visible only to a service that decodes more than it should:
//! `..` next to an encoded slash (`%2F`), a backslash or an encoded backslash (`%5C`),
//! a double-encoded dot (`%252e`), or a `..;` path parameter (servlet containers).
//! [`check_target`] refuses those instead of guessing how the service reads them; an
//! encoded slash or backslash that forms no `..` (`/repos/group%2Fproject`) passes
//! unchanged, because services that use them mean them as data.
//!
//! Also how a foreign answer is shown: when something that is not an adi hub answers
//! at a hub's address, the CLI and the cocoon quote the start of what it said.

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus the ones a
/// proxy must not pass on.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether a header must be dropped at a proxy (also when `connection` names it).
pub fn is_hop_by_hop(name: &str, connection_header: Option<&str>) -> bool {
    let lower = name.to_ascii_lowercase();
    HOP_BY_HOP.contains(&lower.as_str())
        || connection_header.is_some_and(|c| {
            c.split(',')
                .any(|token| token.trim().eq_ignore_ascii_case(&lower))
        })
}

/// The protocol a request asks to switch to, given its `Connection` and `Upgrade`
/// headers: only when `Connection` lists `upgrade` and `Upgrade` names something.
pub fn requested_upgrade(connection: Option<&str>, upgrade: Option<&str>) -> Option<String> {
    let asks = connection?
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let protocol = upgrade?.trim();
    (asks && !protocol.is_empty()).then(|| protocol.to_owned())
}

/// A request target that could climb above the service's root at a service that decodes
/// separators the proxy does not split on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsafeTarget {
    /// A path segment hides a `..` behind an encoded slash, a backslash, an encoded
    /// backslash, double encoding or a `;` parameter.
    #[error(
        "path segment {0:?} hides a `..` (behind %2F, a backslash, %5C, double encoding \
         or a `;` parameter); it could climb above the service's root"
    )]
    HiddenDotSegment(String),
}

/// Checks and normalises a request target: refuses one whose path hides a `..` that
/// only a decoding service would see ([`UnsafeTarget`]), then resolves the visible dot
/// segments as [`normalize_target`] does.
pub fn check_target(target: &str) -> Result<String, UnsafeTarget> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    for seg in path.split('/') {
        if seg.is_empty() || is_dot(seg) || is_dotdot(seg) {
            continue;
        }
        if hides_dotdot(seg) {
            let shown: String = seg.chars().take(80).collect();
            return Err(UnsafeTarget::HiddenDotSegment(shown));
        }
    }
    Ok(normalize_target(target))
}

/// Whether one segment (between real slashes) reads as `..`, or contains a `..` piece,
/// once percent-encoding is undone as often as a careless service might, backslashes
/// and encoded separators are taken as separators, and `;` parameters are dropped.
fn hides_dotdot(seg: &str) -> bool {
    // Without an escape, a backslash or a parameter, a segment is what it looks like
    // (and a plain `..` was resolved before): the common case costs no allocation.
    if !seg.contains(['%', '\\', ';']) {
        return seg == "..";
    }
    let s = collapse_escaped_percents(&seg.to_ascii_lowercase());
    let s = s
        .replace("%2f", "/")
        .replace("%5c", "/")
        .replace('\\', "/")
        .replace("%2e", ".");
    s.split('/')
        .any(|piece| piece.split(';').next() == Some(".."))
}

/// Undoes `%25` (an escaped `%`) as often as a service decoding again and again would,
/// so `%252e` reads `%2e`: a `%` and every `25` right after it become one `%`. One pass,
/// where replacing until nothing changes would take a pass per `25` (quadratic in a
/// head of `%252525...`).
fn collapse_escaped_percents(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..=i]);
        rest = &rest[i + 1..];
        while let Some(after) = rest.strip_prefix("25") {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Normalises a request target (`/path?query`) for a service: the path always starts
/// with `/`, and `.`/`..` segments (also percent-encoded ones) are resolved without ever
/// going above `/`. The query is kept as it was.
pub fn normalize_target(target: &str) -> String {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let trailing =
        path.ends_with('/') || segments.last().is_some_and(|s| is_dot(s) || is_dotdot(s));
    for seg in segments {
        if seg.is_empty() || is_dot(seg) {
            continue;
        }
        if is_dotdot(seg) {
            out.pop();
            continue;
        }
        out.push(seg);
    }
    let mut normalized = String::with_capacity(target.len() + 1);
    normalized.push('/');
    normalized.push_str(&out.join("/"));
    if trailing && !out.is_empty() {
        normalized.push('/');
    }
    if let Some(q) = query {
        normalized.push('?');
        normalized.push_str(q);
    }
    normalized
}

/// Whether `seg` is `want` (dots only) once `%2e` is read as a dot. Every segment of
/// every proxied path passes here, so the common cases cost no allocation: a segment
/// longer than `want` fully encoded, or one without an escape.
fn decoded_eq(seg: &str, want: &str) -> bool {
    if seg.len() > want.len() * 3 {
        return false;
    }
    if !seg.contains('%') {
        return seg == want;
    }
    let lower = seg.to_ascii_lowercase().replace("%2e", ".");
    lower == want
}

/// Longest quote of a foreign answer, in characters.
const EXCERPT_CHARS: usize = 120;

/// The start of a body some other server answered with, as one line of its text (tags
/// dropped, whitespace collapsed, cut with an ellipsis): enough to tell a web server's
/// error page or another API apart in a log line. Empty for an empty body.
pub fn excerpt(body: &[u8]) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in String::from_utf8_lossy(body).chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                text.push(' ');
            }
            _ if in_tag => {}
            c if c.is_control() => text.push(' '),
            c => text.push(c),
        }
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    let line = words.join(" ");
    let cut: String = line.chars().take(EXCERPT_CHARS).collect();
    if cut.len() < line.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

fn is_dot(seg: &str) -> bool {
    decoded_eq(seg, ".")
}

fn is_dotdot(seg: &str) -> bool {
    decoded_eq(seg, "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the one-pass collapse must equal: replacing until nothing changes.
    fn collapse_by_repeating(s: &str) -> String {
        let mut s = s.to_owned();
        while s.contains("%25") {
            s = s.replace("%25", "%");
        }
        s
    }

    proptest::proptest! {
        #[test]
        fn escaped_percents_collapse_in_one_pass_as_by_repeating(s in "[%25e.x/]{0,40}") {
            proptest::prop_assert_eq!(collapse_escaped_percents(&s), collapse_by_repeating(&s));
        }
    }

    #[test]
    fn a_dot_dot_behind_many_escaped_percents_is_still_found() {
        let seg = format!("%{}2e%2e", "25".repeat(30_000));
        assert!(hides_dotdot(&seg));
        assert!(matches!(
            check_target(&format!("/a/{seg}/etc/passwd")),
            Err(UnsafeTarget::HiddenDotSegment(_))
        ));
    }

    #[test]
    fn a_foreign_answer_is_quoted_as_one_line_of_its_text() {
        assert_eq!(
            excerpt(b"<html><head><title>404 Not Found</title></head>\n<body><h1>Not Found</h1></body></html>"),
            "404 Not Found Not Found"
        );
        assert_eq!(
            excerpt(b"{\"detail\": \"nope\"}\r\n"),
            "{\"detail\": \"nope\"}"
        );
        assert_eq!(excerpt(b""), "");
        let long = excerpt("é".repeat(500).as_bytes());
        assert_eq!(long.chars().count(), EXCERPT_CHARS + 1);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn dot_segments_never_climb_above_the_root() {
        for (given, want) in [
            ("", "/"),
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/a/../b", "/b"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/%2e%2e/%2E%2e/b", "/b"),
            ("/a/.%2e/b", "/b"),
            ("/a/./b/.", "/a/b/"),
            ("a/b", "/a/b"),
            ("//evil.example/x", "/evil.example/x"),
            ("/x?next=/../y", "/x?next=/../y"),
        ] {
            assert_eq!(normalize_target(given), want, "{given}");
            assert_eq!(check_target(given).as_deref(), Ok(want), "{given}");
        }
    }

    #[test]
    fn dot_segments_hidden_behind_encoded_separators_are_refused() {
        for given in [
            "/%2f..%2f",
            "/..%2f..%2fx",
            "/..%2F..%2Fetc/passwd",
            "/a/%2e%2e%2fb",
            "/a/.%2E%5cb",
            "/..%5c..%5cwindows",
            "/a\\..\\..\\b",
            "/..\\x",
            "/x/%252e%252e/y",
            "/x/%252e%252e%252fy",
            "/x/..;/admin",
            "/x/%2e%2e;jsessionid=1/admin",
        ] {
            assert!(
                matches!(check_target(given), Err(UnsafeTarget::HiddenDotSegment(_))),
                "{given} must be refused"
            );
        }
    }

    #[test]
    fn encoded_separators_that_form_no_climb_pass_unchanged() {
        for (given, want) in [
            (
                "/repos/group%2Fproject/files",
                "/repos/group%2Fproject/files",
            ),
            ("/a%2fb%5cc", "/a%2fb%5cc"),
            ("/dir\\file.txt", "/dir\\file.txt"),
            ("/v1.2/..x/x..", "/v1.2/..x/x.."),
            ("/a/.%2e/b%2f.%2fc", "/b%2f.%2fc"),
            ("/name;v=1/x", "/name;v=1/x"),
            ("/x?next=..%2f..%2f", "/x?next=..%2f..%2f"),
            ("/%25/%2525", "/%25/%2525"),
        ] {
            assert_eq!(check_target(given).as_deref(), Ok(want), "{given}");
        }
    }

    #[test]
    fn an_upgrade_needs_both_headers() {
        assert_eq!(
            requested_upgrade(Some("keep-alive, Upgrade"), Some(" websocket ")),
            Some("websocket".to_owned())
        );
        assert_eq!(
            requested_upgrade(Some("keep-alive"), Some("websocket")),
            None
        );
        assert_eq!(requested_upgrade(None, Some("websocket")), None);
        assert_eq!(requested_upgrade(Some("upgrade"), None), None);
        assert_eq!(requested_upgrade(Some("upgrade"), Some("")), None);
    }

    #[test]
    fn hop_by_hop_headers_are_recognised() {
        assert!(is_hop_by_hop("Connection", None));
        assert!(is_hop_by_hop("transfer-encoding", None));
        assert!(is_hop_by_hop("X-Custom", Some("keep-alive, x-custom")));
        assert!(!is_hop_by_hop("content-type", Some("close")));
    }
}
