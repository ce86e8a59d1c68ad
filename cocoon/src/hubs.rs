//! The hubs a cocoon may connect to, and which one it tries next. The configured hubs
//! come first, the primary at their head; the hubs a hub names as the rest of its
//! cluster (`Registered::hubs`) follow, in memory only, replaced at every registration
//! so that the list follows the cluster.
//!
//! A lost hub is left at once for the next one, and the reconnect delay grows only once
//! every hub of the list has failed in a row, so a device whose hub died is back on
//! another within a heartbeat or so while a fleet that lost every hub still backs off.
//! With a single hub this is the plain capped exponential backoff.
//!
//! What a hub announces is taken for hostile: only so many addresses, each of bounded
//! length, of the four schemes, with no credentials, query or fragment, and never a
//! plaintext address from a hub reached over TLS (the device would send its secret in
//! the clear). This module must never make a configured hub go away.

use reqwest::Url;
use tracing::{info, warn};

/// At most this many learned hubs are kept; a longer announcement is cut short.
pub(crate) const MAX_LEARNED: usize = 64;
/// Longest hub URL taken from a hub's announcement.
pub(crate) const MAX_URL_LEN: usize = 2048;

/// One hub address, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hub {
    /// As given (without a trailing `/`) for a configured hub, as parsed for a learned
    /// one: what is dialled and named in logs.
    url: String,
    /// The same hub however it is spelled (`ws` or `http`, a default port or none, a
    /// trailing `/`), so that no hub is listed twice.
    key: String,
    /// Whether it is reached over TLS.
    tls: bool,
}

impl Hub {
    /// Checks a hub URL; says what is wrong with it otherwise.
    pub(crate) fn parse(url: &str) -> Result<Hub, String> {
        let base = url.trim_end_matches('/');
        if base.len() > MAX_URL_LEN {
            return Err(format!("longer than {MAX_URL_LEN} characters"));
        }
        // The URL parser would drop tabs and newlines and read `\` as `/`: the address
        // dialled must be the one that was checked and logged.
        if base
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
        {
            return Err("contains whitespace, control characters or a backslash".into());
        }
        let parsed = Url::parse(base).map_err(|e| e.to_string())?;
        let (scheme, tls) = match parsed.scheme() {
            "http" | "ws" => ("http", false),
            "https" | "wss" => ("https", true),
            _ => return Err("must start with http://, https://, ws:// or wss://".into()),
        };
        let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
            return Err("names no host".into());
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("must not carry credentials".into());
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err("must not have a query or a fragment".into());
        }
        let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
        let path = parsed.path().trim_end_matches('/');
        Ok(Hub {
            url: base.to_owned(),
            key: format!("{scheme}://{host}{port}{path}"),
            tls,
        })
    }

    /// A learned hub: dialled as parsed, so what a hub sends is never dialled raw.
    fn learned(url: &str) -> Result<Hub, String> {
        let mut hub = Hub::parse(url)?;
        if let Ok(parsed) = Url::parse(&hub.url) {
            hub.url = parsed.as_str().trim_end_matches('/').to_owned();
        }
        Ok(hub)
    }

    /// The base URL, as dialled and named in logs.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// The hub's WebSocket endpoint for cocoons; `bodies` asks for a reader that
    /// handles large frames well (a device with services will carry proxied bodies;
    /// hubs that predate the hint ignore it).
    pub(crate) fn ws_url(&self, bodies: bool) -> String {
        let (scheme, rest) = self.url.split_once("://").unwrap_or(("", &self.url));
        let ws = match (
            scheme.eq_ignore_ascii_case("ws") || scheme.eq_ignore_ascii_case("wss"),
            self.tls,
        ) {
            (true, _) => scheme.to_ascii_lowercase(),
            (false, true) => "wss".to_owned(),
            (false, false) => "ws".to_owned(),
        };
        let hint = if bodies { "?bodies=1" } else { "" };
        format!("{ws}://{rest}/ws/cocoon{hint}")
    }
}

/// The next attempt, after a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retry {
    /// Attempts since the last registration (or since the start), this one counted
    /// from 0: what the state and the log report.
    pub(crate) attempt: u32,
    /// The step of the exponential backoff: full rounds of the list that failed.
    pub(crate) step: u32,
}

/// The hubs, and where the rotation stands.
#[derive(Debug)]
pub(crate) struct Hubs {
    /// The configured hubs first (the primary at 0), then the learned ones.
    list: Vec<Hub>,
    configured: usize,
    current: usize,
    attempt: u32,
}

impl Hubs {
    /// The primary and the other configured hubs, in order, each listed once.
    pub(crate) fn new(primary: &str, others: &[String]) -> Result<Hubs, crate::CocoonError> {
        let mut list: Vec<Hub> = Vec::with_capacity(1 + others.len());
        for url in std::iter::once(primary).chain(others.iter().map(String::as_str)) {
            let hub = Hub::parse(url).map_err(|why| crate::CocoonError::HubUrl {
                url: url.to_owned(),
                why,
            })?;
            if !list.iter().any(|h| h.key == hub.key) {
                list.push(hub);
            }
        }
        Ok(Hubs {
            configured: list.len(),
            list,
            current: 0,
            attempt: 0,
        })
    }

    /// The hub the next attempt goes to.
    pub(crate) fn current(&self) -> &Hub {
        &self.list[self.current]
    }

    /// How many hubs are known now.
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// A session on the current hub ended, having registered or not: the next attempt
    /// goes to the next hub. A registration starts the count afresh, so a device that
    /// lost its hub tries the next one after the shortest delay.
    pub(crate) fn advance(&mut self, registered: bool) -> Retry {
        if registered {
            self.attempt = 0;
        }
        let attempt = self.attempt;
        self.attempt = self.attempt.saturating_add(1);
        self.current = (self.current + 1) % self.list.len();
        let round = u32::try_from(self.list.len()).unwrap_or(u32::MAX).max(1);
        Retry {
            attempt,
            step: attempt / round,
        }
    }

    /// The current hub named these others as its cluster: they replace the hubs learned
    /// before. The current hub stays, wherever it came from; what fails the checks is
    /// left out and said once.
    pub(crate) fn learn(&mut self, announced: &[String]) {
        let current = self.list[self.current].clone();
        let mut learned: Vec<Hub> = Vec::new();
        if self.current >= self.configured {
            learned.push(current.clone());
        }
        let mut refused = 0usize;
        let mut plaintext = 0usize;
        let mut over = 0usize;
        for url in announced {
            let hub = match Hub::learned(url) {
                Ok(hub) => hub,
                Err(_) => {
                    refused += 1;
                    continue;
                }
            };
            if current.tls && !hub.tls {
                plaintext += 1;
                continue;
            }
            let known = self.list[..self.configured]
                .iter()
                .chain(&learned)
                .any(|h| h.key == hub.key);
            if known {
                continue;
            }
            if learned.len() >= MAX_LEARNED {
                over += 1;
                continue;
            }
            learned.push(hub);
        }
        if refused > 0 {
            warn!(
                refused,
                "the hub named other hubs whose addresses are not hub URLs; they are left out"
            );
        }
        if plaintext > 0 {
            warn!(plaintext, "the hub, reached over TLS, named other hubs without TLS; they are left out, so the device secret never travels in the clear");
        }
        if over > 0 {
            warn!(
                over,
                max = MAX_LEARNED,
                "the hub named more other hubs than are kept; the rest are left out"
            );
        }
        let changed = self.list[self.configured..] != learned[..];
        self.list.truncate(self.configured);
        self.list.extend(learned);
        self.current = self
            .list
            .iter()
            .position(|h| h.key == current.key)
            .unwrap_or(0);
        if changed && self.list.len() > self.configured {
            let names: Vec<&str> = self.list[self.configured..].iter().map(Hub::url).collect();
            info!(
                hubs = self.list.len(),
                "hubs of this hub's cluster to fall back on: {}",
                names.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hubs(urls: &[&str]) -> Hubs {
        let others: Vec<String> = urls[1..].iter().map(|u| (*u).to_owned()).collect();
        Hubs::new(urls[0], &others).expect("valid hubs")
    }

    fn urls(hubs: &Hubs) -> Vec<&str> {
        hubs.list.iter().map(Hub::url).collect()
    }

    /// Tried hub, then the attempt and backoff step of the delay that follows.
    fn trace(hubs: &mut Hubs, ends: &[bool]) -> Vec<(String, u32, u32)> {
        ends.iter()
            .map(|&registered| {
                let tried = hubs.current().url().to_owned();
                let retry = hubs.advance(registered);
                (tried, retry.attempt, retry.step)
            })
            .collect()
    }

    #[test]
    fn a_single_hub_backs_off_as_it_always_did() {
        let mut h = hubs(&["http://a"]);
        let t = trace(&mut h, &[false, false, false, true, false, false]);
        let steps: Vec<(u32, u32)> = t.iter().map(|(_, a, s)| (*a, *s)).collect();
        assert_eq!(steps, [(0, 0), (1, 1), (2, 2), (0, 0), (1, 1), (2, 2)]);
        assert!(t.iter().all(|(hub, _, _)| hub == "http://a"));
    }

    /// A lost hub is left for the next at once; the delay grows only after a whole
    /// round of the list has failed.
    #[test]
    fn hubs_rotate_and_the_backoff_grows_once_per_full_round() {
        let mut h = hubs(&["http://a", "http://b", "http://c"]);
        // Never online: a, b, c at the first step, then the next round at the second.
        let t = trace(&mut h, &[false, false, false, false, false, false, false]);
        let expected = [
            ("http://a", 0, 0),
            ("http://b", 1, 0),
            ("http://c", 2, 0),
            ("http://a", 3, 1),
            ("http://b", 4, 1),
            ("http://c", 5, 1),
            ("http://a", 6, 2),
        ];
        let got: Vec<(&str, u32, u32)> = t.iter().map(|(u, a, s)| (u.as_str(), *a, *s)).collect();
        assert_eq!(got, expected);
        // Online on b, which dies: c next at the shortest delay, then a, then b again,
        // and only then longer.
        assert_eq!(h.current().url(), "http://b");
        let t = trace(&mut h, &[true, false, false, false, false]);
        let got: Vec<(&str, u32, u32)> = t.iter().map(|(u, a, s)| (u.as_str(), *a, *s)).collect();
        assert_eq!(
            got,
            [
                ("http://b", 0, 0),
                ("http://c", 1, 0),
                ("http://a", 2, 0),
                ("http://b", 3, 1),
                ("http://c", 4, 1),
            ]
        );
    }

    #[test]
    fn a_hub_given_twice_is_listed_once() {
        let h = hubs(&[
            "http://hub.example:80/",
            "ws://HUB.example",
            "https://hub.example",
            "wss://hub.example:443/",
            "http://hub.example:8080",
        ]);
        assert_eq!(
            urls(&h),
            [
                "http://hub.example:80",
                "https://hub.example",
                "http://hub.example:8080"
            ]
        );
    }

    #[test]
    fn configured_hubs_are_checked() {
        for bad in [
            "ftp://hub",
            "hub:8080",
            "http://",
            "http://user:pw@hub",
            "http://hub/?x=1",
            "http://hub/#x",
            "http://hub\n.example",
            "http://evil\\@hub",
        ] {
            assert!(
                matches!(Hubs::new(bad, &[]), Err(crate::CocoonError::HubUrl { .. })),
                "{bad:?} accepted"
            );
            assert!(
                Hubs::new("http://ok", &[bad.to_owned()]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn endpoints_keep_the_address_as_given() {
        let ws = |url: &str, bodies| Hub::parse(url).expect("valid").ws_url(bodies);
        assert_eq!(
            ws("http://127.0.0.1:8080/", false),
            "ws://127.0.0.1:8080/ws/cocoon"
        );
        assert_eq!(
            ws("https://hub.example", false),
            "wss://hub.example/ws/cocoon"
        );
        assert_eq!(
            ws("HTTPS://hub.example/adi", true),
            "wss://hub.example/adi/ws/cocoon?bodies=1"
        );
        assert_eq!(
            ws("wss://hub.example", false),
            "wss://hub.example/ws/cocoon"
        );
        assert_eq!(ws("ws://[::1]:9", false), "ws://[::1]:9/ws/cocoon");
    }

    #[test]
    fn what_a_hub_announces_is_checked_deduplicated_and_bounded() {
        let mut h = hubs(&["http://a:1", "http://b:1"]);
        let long = format!("http://{}.example", "x".repeat(MAX_URL_LEN));
        let announced: Vec<String> = [
            "http://c:1",
            "ws://a:1/",   // the primary, spelled otherwise
            "http://c:1/", // twice
            "ftp://d",     // not a hub
            "http://e:1\r\nforged log line",
            "http://f:1/?redirect=evil",
            "javascript:alert(1)",
            "",
            long.as_str(),
            "wss://g",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        h.learn(&announced);
        assert_eq!(
            urls(&h),
            ["http://a:1", "http://b:1", "http://c:1", "wss://g"]
        );

        // At most MAX_LEARNED are kept.
        let many: Vec<String> = (0..1000).map(|i| format!("http://h{i}:1")).collect();
        h.learn(&many);
        assert_eq!(h.len(), 2 + MAX_LEARNED);
        assert_eq!(h.current().url(), "http://a:1");
    }

    #[test]
    fn a_new_announcement_replaces_the_learned_hubs_but_never_the_current_one() {
        let mut h = hubs(&["http://a:1"]);
        h.learn(&["http://b:1".to_owned(), "http://c:1".to_owned()]);
        assert_eq!(urls(&h), ["http://a:1", "http://b:1", "http://c:1"]);
        // a is lost; the device registers on b, whose cluster is now c and d.
        h.advance(true);
        assert_eq!(h.current().url(), "http://b:1");
        h.learn(&["http://c:1".to_owned(), "http://d:1".to_owned()]);
        assert_eq!(
            urls(&h),
            ["http://a:1", "http://b:1", "http://c:1", "http://d:1"]
        );
        assert_eq!(h.current().url(), "http://b:1");
        // b now runs alone: the configured hub and b itself stay.
        h.learn(&[]);
        assert_eq!(urls(&h), ["http://a:1", "http://b:1"]);
        assert_eq!(h.current().url(), "http://b:1");
        // Losing b goes back to the configured primary.
        h.advance(true);
        assert_eq!(h.current().url(), "http://a:1");
    }

    /// A device reached over TLS would send its secret in the clear to a plaintext hub.
    #[test]
    fn a_hub_reached_over_tls_cannot_send_the_device_to_plaintext() {
        let mut h = hubs(&["https://a"]);
        h.learn(&[
            "http://b".to_owned(),
            "ws://c".to_owned(),
            "https://d".to_owned(),
            "wss://e".to_owned(),
        ]);
        assert_eq!(urls(&h), ["https://a", "https://d", "wss://e"]);
        let mut plain = hubs(&["http://a"]);
        plain.learn(&["http://b".to_owned(), "https://c".to_owned()]);
        assert_eq!(urls(&plain), ["http://a", "http://b", "https://c"]);
    }
}
