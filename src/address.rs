//! Addresses of the agent endpoint: `host:port`, `http://host:port`, or
//! `unix:/path`; the same forms for `trace --probe-addr` and `serve --listen`.

use std::fmt;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `host:port`, resolved when connecting or binding.
    Tcp(String),
    Unix(PathBuf),
}

impl Address {
    pub fn parse(text: &str) -> Result<Address, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{text:?}: a unix address needs a path (unix:/path)"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let hostport = text.strip_prefix("http://").unwrap_or(text).trim_end_matches('/');
        match hostport.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Address::Tcp(hostport.to_owned()))
            }
            _ => Err(format!("{text:?}: expected host:port, http://host:port or unix:/path")),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(hostport) => write!(f, "{hostport}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(Address::parse("localhost:5678"), Ok(Address::Tcp("localhost:5678".into())));
        assert_eq!(Address::parse("http://127.0.0.1:5678/"), Ok(Address::Tcp("127.0.0.1:5678".into())));
        assert_eq!(Address::parse("[::1]:5678"), Ok(Address::Tcp("[::1]:5678".into())));
        assert_eq!(Address::parse("unix:/run/agent.sock"), Ok(Address::Unix("/run/agent.sock".into())));
        assert!(Address::parse("localhost").is_err());
        assert!(Address::parse("unix:").is_err());
    }
}
