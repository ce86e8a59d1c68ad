//! HTTP rules the hub and the cocoon apply the same way when proxying: which headers
//! never cross a proxy, and how a requested path is normalised so that no `..`, however
//! encoded, climbs above the service's root.

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

fn decoded_eq(seg: &str, want: &str) -> bool {
    let lower = seg.to_ascii_lowercase().replace("%2e", ".");
    lower == want
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
            ("/%2f..%2f", "/%2f..%2f"),
        ] {
            assert_eq!(normalize_target(given), want, "{given}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_recognised() {
        assert!(is_hop_by_hop("Connection", None));
        assert!(is_hop_by_hop("transfer-encoding", None));
        assert!(is_hop_by_hop("X-Custom", Some("keep-alive, x-custom")));
        assert!(!is_hop_by_hop("content-type", Some("close")));
    }
}
