//! The words of access control that the hub, its clients and its catalog share: a
//! member's role on a device. Deciding who may do what is the hub's `access` module's
//! job alone; this module only names things.

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

#[cfg(test)]
mod tests {
    use super::*;

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
