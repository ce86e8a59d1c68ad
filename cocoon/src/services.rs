//! What a service declaration must be, however it is given: a `--service`, `--openai`
//! or `--tcp` flag, `COCOON_SERVICES`, `COCOON_OPENAI` or `COCOON_TCP`, a `[[services]]`
//! table or an `openai` or `tcp` list in `cocoon.toml`, or an `[[openai]]` or `[[tcp]]`
//! table in a plugin manifest. One
//! check for all of them, so a name the proxy could not route, a port that cannot be
//! listened on or a name given twice is refused wherever it was written.

use adi_protocol::{ServiceInfo, ServiceKind};

/// Why a service declaration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// Not of the `NAME:PORT[/HEALTH]` form.
    #[error("service {0:?} is not NAME:PORT")]
    Form(String),
    /// A name the proxy path could not carry.
    #[error("service name {0:?} must be 1-64 of [A-Za-z0-9._-]")]
    Name(String),
    /// Not a port a service can listen on.
    #[error("service port {0:?} is not 1-65535")]
    Port(String),
    /// Two services of one device with one name: the proxy could reach only one.
    #[error("service {0:?} is given twice")]
    Duplicate(String),
}

/// Parses `NAME:PORT[/HEALTH]` and checks it.
pub fn parse(s: &str) -> Result<ServiceInfo, ServiceError> {
    let (name, rest) = s
        .trim()
        .split_once(':')
        .ok_or_else(|| ServiceError::Form(s.to_owned()))?;
    let (port, health) = match rest.split_once('/') {
        Some((p, h)) => (p, Some(h)),
        None => (rest, None),
    };
    let port: u16 = port
        .parse()
        .map_err(|_| ServiceError::Port(port.to_owned()))?;
    check(name, port, health)
}

/// Parses an OpenAI-compatible server's `NAME:PORT` (it is probed through its
/// `/v1/models`, so it takes no health path) and checks it.
pub fn parse_openai(s: &str) -> Result<ServiceInfo, ServiceError> {
    let (name, port) = name_port(s)?;
    openai(name, port)
}

/// Checks a declared OpenAI-compatible server: a service like any other, of kind
/// [`ServiceKind::OpenAi`], with no models until its `/v1/models` answers.
pub fn openai(name: &str, port: u16) -> Result<ServiceInfo, ServiceError> {
    let mut service = check(name, port, None)?;
    service.kind = ServiceKind::OpenAi;
    Ok(service)
}

/// Parses a raw TCP service's `NAME:PORT` (it speaks no HTTP, so it takes no health
/// path: it is up while its port accepts a connection) and checks it.
pub fn parse_tcp(s: &str) -> Result<ServiceInfo, ServiceError> {
    let (name, port) = name_port(s)?;
    tcp(name, port)
}

/// Checks a declared raw TCP service (SSH, a database): of kind [`ServiceKind::Tcp`],
/// reached only as a byte stream, never with an HTTP request.
pub fn tcp(name: &str, port: u16) -> Result<ServiceInfo, ServiceError> {
    let mut service = check(name, port, None)?;
    service.kind = ServiceKind::Tcp;
    Ok(service)
}

/// `NAME:PORT`, the port a number (range checked by [`check`]).
fn name_port(s: &str) -> Result<(&str, u16), ServiceError> {
    let (name, port) = s
        .trim()
        .split_once(':')
        .ok_or_else(|| ServiceError::Form(s.to_owned()))?;
    let port: u16 = port
        .parse()
        .map_err(|_| ServiceError::Port(port.to_owned()))?;
    Ok((name, port))
}

/// Refuses a list that gives one name twice, whatever the kinds.
pub fn unique(services: &[ServiceInfo]) -> Result<(), ServiceError> {
    let mut names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    match names.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(ServiceError::Duplicate(w[0].to_owned())),
        None => Ok(()),
    }
}

/// Checks a declared service: its name, its port, and its health path (made to start
/// with `/`).
pub fn check(name: &str, port: u16, health: Option<&str>) -> Result<ServiceInfo, ServiceError> {
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && name != "."
        && name != "..";
    if !name_ok {
        return Err(ServiceError::Name(name.to_owned()));
    }
    if port == 0 {
        return Err(ServiceError::Port(port.to_string()));
    }
    Ok(ServiceInfo {
        name: name.to_owned(),
        port,
        health_path: health.map(|h| {
            if h.starts_with('/') {
                h.to_owned()
            } else {
                format!("/{h}")
            }
        }),
        kind: ServiceKind::Http,
        models: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_parse_with_and_without_health_and_bad_ones_say_why() {
        let s = parse("grafana:3000").expect("ok");
        assert_eq!(
            (s.name.as_str(), s.port, s.health_path),
            ("grafana", 3000, None)
        );
        let s = parse("api:8092/healthz").expect("ok");
        assert_eq!(s.health_path.as_deref(), Some("/healthz"));
        assert_eq!(parse("nope"), Err(ServiceError::Form("nope".into())));
        assert!(matches!(parse("x:0"), Err(ServiceError::Port(_))));
        assert!(matches!(parse("x:70000"), Err(ServiceError::Port(_))));
        assert!(matches!(parse("../etc:80"), Err(ServiceError::Name(_))));
        assert!(matches!(parse("..:80"), Err(ServiceError::Name(_))));
        assert!(matches!(check("a b", 80, None), Err(ServiceError::Name(_))));
        assert_eq!(
            check("web", 80, Some("health"))
                .expect("ok")
                .health_path
                .as_deref(),
            Some("/health")
        );
    }

    #[test]
    fn openai_servers_are_name_port_and_clash_with_any_other_service() {
        let s = parse_openai(" llm:8080 ").expect("ok");
        assert_eq!((s.name.as_str(), s.port), ("llm", 8080));
        assert_eq!(s.kind, ServiceKind::OpenAi);
        assert!(s.models.is_empty() && s.health_path.is_none());
        assert!(matches!(
            parse_openai("llm:8080/health"),
            Err(ServiceError::Port(_))
        ));
        assert!(matches!(parse_openai("llm"), Err(ServiceError::Form(_))));
        assert!(matches!(parse_openai("llm:0"), Err(ServiceError::Port(_))));
        assert!(matches!(parse_openai("l/m:80"), Err(ServiceError::Name(_))));
        let web = parse("web:80").expect("ok");
        assert_eq!(unique(&[web.clone(), s.clone()]), Ok(()));
        let clash = parse_openai("web:81").expect("ok");
        assert_eq!(
            unique(&[web, s, clash]),
            Err(ServiceError::Duplicate("web".into()))
        );
    }

    #[test]
    fn tcp_services_are_name_port_of_kind_tcp_and_clash_with_any_other_service() {
        let ssh = parse_tcp(" ssh:22 ").expect("ok");
        assert_eq!((ssh.name.as_str(), ssh.port), ("ssh", 22));
        assert_eq!(ssh.kind, ServiceKind::Tcp);
        assert!(ssh.health_path.is_none() && ssh.models.is_empty());
        assert!(matches!(parse_tcp("ssh:22/x"), Err(ServiceError::Port(_))));
        assert!(matches!(parse_tcp("ssh"), Err(ServiceError::Form(_))));
        assert!(matches!(parse_tcp("ssh:0"), Err(ServiceError::Port(_))));
        assert!(matches!(parse_tcp("s h:22"), Err(ServiceError::Name(_))));
        let web = parse("ssh:80").expect("ok");
        assert_eq!(
            unique(&[web, ssh]),
            Err(ServiceError::Duplicate("ssh".into()))
        );
    }
}
