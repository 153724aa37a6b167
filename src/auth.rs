//! Who may write into a session: the shared token that `trace` presents and
//! `serve` requires, and the TLS configurations of both ends. Anyone else on
//! the machine who can reach the agent's port must not be able to.
//!
//! The token comes from `--auth-token-file` or, failing that, from the
//! `DD_CWS_INSTRUMENTATION_AUTH_TOKEN` environment variable, which is then
//! removed from the environment: the workload inherits the tracer's
//! environment, and exec events carry it. It travels as gRPC metadata
//! (`authorization: Bearer TOKEN`), is compared in constant time, and is
//! never logged.

use std::fmt;
use std::path::Path;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The environment variable a token may come from.
pub const TOKEN_ENV: &str = "DD_CWS_INSTRUMENTATION_AUTH_TOKEN";
/// The metadata key that carries it.
const HEADER: &str = "authorization";
const SCHEME: &str = "Bearer ";
/// Longer tokens are refused: a file given by mistake should not be sent.
const MAX_TOKEN: usize = 4096;

#[derive(Clone)]
pub struct Token(String);

/// Never shows the token itself.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// The token from `file`, else from the environment (then removed from
    /// it); None when neither gives one. Call before any thread starts: it
    /// changes the environment.
    pub fn load(file: Option<&Path>) -> Result<Option<Token>, String> {
        let from_env = std::env::var_os(TOKEN_ENV);
        std::env::remove_var(TOKEN_ENV);
        let (text, source) = match (file, from_env) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
                (text, format!("the token file {}", path.display()))
            }
            (None, Some(value)) => {
                let text = value.into_string().map_err(|_| format!("{TOKEN_ENV} is not UTF-8"))?;
                (text, TOKEN_ENV.to_owned())
            }
            (None, None) => return Ok(None),
        };
        // A file usually ends with a newline; it is not part of the token.
        let token = text.trim_end_matches(['\n', '\r']);
        let usable = !token.is_empty() && token.len() <= MAX_TOKEN && token.bytes().all(|b| b.is_ascii_graphic());
        if !usable {
            return Err(format!("{source}: a token is 1 to {MAX_TOKEN} printable ASCII characters, without spaces"));
        }
        Ok(Some(Token(token.to_owned())))
    }

    /// Adds the token to a request's metadata.
    pub fn attach(&self, metadata: &mut MetadataMap) {
        // Only printable ASCII (checked in `load`): always a valid value.
        if let Ok(value) = AsciiMetadataValue::try_from(format!("{SCHEME}{}", self.0)) {
            metadata.insert(HEADER, value);
        }
    }

    /// Whether a request's metadata carries this token. The comparison
    /// takes the same time wherever the first difference is.
    pub fn admits(&self, metadata: &MetadataMap) -> bool {
        let presented = metadata.get(HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix(SCHEME));
        presented.is_some_and(|presented| equal_in_constant_time(presented.as_bytes(), self.0.as_bytes()))
    }
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

/// A certificate and its key, both or neither.
fn identity(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<Identity>, String> {
    match (cert, key) {
        (Some(cert), Some(key)) => {
            Ok(Some(Identity::from_pem(read_pem(cert, "certificate")?, read_pem(key, "private key")?)))
        }
        (None, None) => Ok(None),
        _ => Err("--tls-cert and --tls-key go together".to_owned()),
    }
}

/// The tracer's TLS: the agent's certificate must chain to `ca`; `cert`
/// and `key` are its own, for an agent that asks for one. None without `ca`.
pub fn client_tls(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<ClientTlsConfig>, String> {
    let identity = identity(cert, key)?;
    let Some(ca) = ca else {
        return match identity {
            Some(_) => Err("--tls-cert needs --tls-ca (the authority the agent's certificate comes from)".to_owned()),
            None => Ok(None),
        };
    };
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(ca, "CA certificate")?));
    if let Some(identity) = identity {
        config = config.identity(identity);
    }
    // Built once here so that unusable files fail at start, not at each connect.
    tonic::transport::Endpoint::from_static("https://localhost")
        .tls_config(config.clone())
        .map_err(|e| format!("unusable TLS files: {}", crate::log::causes(&e)))?;
    Ok(Some(config))
}

/// `serve`'s TLS: its certificate and key; with `client_ca`, every client
/// must present a certificate that chains to it. None without a certificate.
pub fn server_tls(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<Option<ServerTlsConfig>, String> {
    let Some(identity) = identity(cert, key)? else {
        return match client_ca {
            Some(_) => Err("--tls-client-ca needs --tls-cert and --tls-key".to_owned()),
            None => Ok(None),
        };
    };
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(read_pem(ca, "client CA certificate")?));
    }
    Ok(Some(config))
}

/// What the tracer shows the agent.
#[derive(Clone, Debug, Default)]
pub struct AgentCredentials {
    pub token: Option<Token>,
    pub tls: Option<ClientTlsConfig>,
}

impl AgentCredentials {
    /// From `trace`'s flags and environment; call before any thread starts.
    pub fn load(args: &crate::cli::TraceArgs) -> Result<AgentCredentials, String> {
        let token = Token::load(args.auth_token_file.as_deref())?;
        let tls = client_tls(args.tls_ca.as_deref(), args.tls_cert.as_deref(), args.tls_key.as_deref())?;
        if tls.is_some() && args.probe_addr.starts_with("unix:") {
            return Err("--tls-ca is for an agent over TCP, not a unix socket".to_owned());
        }
        Ok(AgentCredentials { token, tls })
    }
}

/// Compares every byte whatever the differences; only the length shows.
fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_admits_only_itself() {
        let token = Token("s3cret-token".to_owned());
        let mut metadata = MetadataMap::new();
        assert!(!token.admits(&metadata), "no token");
        token.attach(&mut metadata);
        assert!(token.admits(&metadata));
        for wrong in
            ["Bearer s3cret-tokeN", "Bearer s3cret-token2", "Bearer s3cret", "s3cret-token", "Basic s3cret-token"]
        {
            metadata.insert(HEADER, AsciiMetadataValue::try_from(wrong).unwrap());
            assert!(!token.admits(&metadata), "{wrong}");
        }
        assert_eq!(format!("{token:?}"), "Token(..)");
    }
}
