//! The words of access control that the hub, its clients and its catalog share: a
//! member's role on a device, and the scopes an API key may be narrowed to. Deciding
//! who may do what is the hub's `access` module's job alone; this module only names
//! things.

use serde::{Deserialize, Serialize};

/// What a member of a device may do with it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Uses the device (its services, tasks and capabilities) and sees it; cannot share
    /// it, remove anyone or delete it.
    User,
    /// Everything a user may, and shares it, removes members and deletes it.
    Owner,
}

impl Role {
    /// The name stored and sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::User => "user",
        }
    }

    /// Parses the stored or typed name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "owner" => Some(Role::Owner),
            "user" => Some(Role::User),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One kind of thing an API key may be allowed to do. A key given no scope has all.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// List and see devices, their services and members; read tasks and their logs.
    #[serde(rename = "devices:read")]
    DevicesRead,
    /// Create, cancel and delete tasks.
    #[serde(rename = "tasks:write")]
    TasksWrite,
    /// Reach devices' services through the proxy.
    #[serde(rename = "proxy")]
    Proxy,
    /// Ask for capabilities served by devices.
    #[serde(rename = "capabilities")]
    Capabilities,
    /// Make and revoke setup and share tokens, claim shares, remove members, leave and
    /// delete devices.
    #[serde(rename = "members:write")]
    MembersWrite,
    /// Create, list and revoke API keys.
    #[serde(rename = "keys:write")]
    KeysWrite,
}

impl Scope {
    /// Every scope, in the order they are listed.
    pub const ALL: [Scope; 6] = [
        Scope::DevicesRead,
        Scope::TasksWrite,
        Scope::Proxy,
        Scope::Capabilities,
        Scope::MembersWrite,
        Scope::KeysWrite,
    ];

    /// The name stored, sent and typed.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::DevicesRead => "devices:read",
            Scope::TasksWrite => "tasks:write",
            Scope::Proxy => "proxy",
            Scope::Capabilities => "capabilities",
            Scope::MembersWrite => "members:write",
            Scope::KeysWrite => "keys:write",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_names_match_serde_and_parse_back() {
        for scope in Scope::ALL {
            let json = serde_json::to_string(&scope).expect("serializes");
            assert_eq!(json, format!("\"{scope}\""));
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(Scope::parse("devices:write"), None);
    }

    #[test]
    fn role_names_match_serde_and_parse_back() {
        for role in [Role::Owner, Role::User] {
            let json = serde_json::to_string(&role).expect("serializes");
            assert_eq!(json, format!("\"{role}\""));
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("admin"), None);
        assert!(Role::Owner > Role::User, "an owner outranks a user");
    }
}
