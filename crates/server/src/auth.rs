//! Bearer-token authorization with per-stream-prefix read and write grants and an admin role.
//!
//! The configuration is a TOML file of tokens:
//!
//! ```toml
//! [[tokens]]
//! name = "orders-service"           # shown in logs, never the token
//! token_sha256 = "9f86d08…"         # hex SHA-256 of the token (or `token = "…"` in clear)
//! read = ["order-", "customer-"]    # stream prefixes this token may read ("" = every stream)
//! write = ["order-"]                # prefixes it may write (appends, soft deletes, metadata)
//! admin = false                     # admin: everything, including tombstones and /metrics
//! ```
//!
//! A write grant implies a read grant on the same prefix. `$all` reads and subscriptions need a
//! read grant that covers the request's filter: `""`, or a prefix of its `prefix` or `category`.

use std::{collections::HashMap, path::Path, sync::Arc};

use axum::{extract::FromRequestParts, http::request::Parts};
use factline_core::EventFilter;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::{
    AppState,
    error::{ApiError, ErrorCode},
};

/// Shortest token accepted in clear (`token = "…"`), in bytes.
pub const TOKEN_BYTES_MIN: usize = 16;
/// Most tokens in one configuration.
pub const TOKENS_MAX: usize = 10_000;

/// One token and its grants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TokenConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// The token in clear (at least [`TOKEN_BYTES_MIN`] bytes). Give this or `token_sha256`.
    #[serde(default)]
    pub token: Option<String>,
    /// The hex SHA-256 of the token. Give this or `token`.
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// Stream prefixes this token may read; `""` covers every stream.
    #[serde(default)]
    pub read: Vec<String>,
    /// Stream prefixes this token may write (and read).
    #[serde(default)]
    pub write: Vec<String>,
    /// Everything, including tombstones and `/metrics`.
    #[serde(default)]
    pub admin: bool,
}

/// The tokens the server accepts.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    by_hash: HashMap<[u8; 32], Arc<Grant>>,
}

/// Why an auth configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthConfigError {
    /// The file could not be read.
    #[error("cannot read the auth config {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("the auth config is not valid: {0}")]
    Parse(#[from] toml::de::Error),
    /// A token entry is wrong.
    #[error("auth config, token {name:?}: {reason}")]
    Token {
        /// The entry's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// No tokens at all, or too many.
    #[error("the auth config must hold 1..={TOKENS_MAX} tokens; it holds {count}")]
    TokenCount {
        /// How many it holds.
        count: usize,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    tokens: Vec<TokenConfig>,
}

impl AuthConfig {
    /// Reads a TOML configuration file.
    pub fn load(path: &Path) -> Result<Self, AuthConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Parses a TOML configuration.
    pub fn from_toml(text: &str) -> Result<Self, AuthConfigError> {
        let file: AuthFile = toml::from_str(text)?;
        Self::from_tokens(file.tokens)
    }

    /// Builds a configuration from token entries.
    pub fn from_tokens(tokens: Vec<TokenConfig>) -> Result<Self, AuthConfigError> {
        if tokens.is_empty() || tokens.len() > TOKENS_MAX {
            return Err(AuthConfigError::TokenCount {
                count: tokens.len(),
            });
        }
        let mut by_hash = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for entry in tokens {
            let fail = |reason: &str| AuthConfigError::Token {
                name: entry.name.clone(),
                reason: reason.to_owned(),
            };
            if entry.name.is_empty() || entry.name.len() > 255 {
                return Err(fail("name must be 1..=255 bytes"));
            }
            if !names.insert(entry.name.clone()) {
                return Err(fail("two tokens have this name"));
            }
            let hash = match (&entry.token, &entry.token_sha256) {
                (Some(token), None) => {
                    if token.len() < TOKEN_BYTES_MIN {
                        return Err(fail(&format!(
                            "token is {} bytes; at least {TOKEN_BYTES_MIN} are required",
                            token.len()
                        )));
                    }
                    sha256(token)
                }
                (None, Some(hex)) => {
                    parse_hex32(hex).ok_or_else(|| fail("token_sha256 must be 64 hex digits"))?
                }
                _ => return Err(fail("give exactly one of token and token_sha256")),
            };
            let grant = Grant::Token {
                name: entry.name.clone(),
                read: entry.read.clone(),
                write: entry.write.clone(),
                admin: entry.admin,
            };
            if by_hash.insert(hash, Arc::new(grant)).is_some() {
                return Err(fail("the same token is configured twice"));
            }
        }
        Ok(Self { by_hash })
    }

    pub(crate) fn grant(&self, token: &str) -> Option<Arc<Grant>> {
        self.by_hash.get(&sha256(token)).cloned()
    }
}

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0_u8; 32];
    for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let text = std::str::from_utf8(pair).ok()?;
        *slot = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// What a caller may do.
#[derive(Debug)]
pub(crate) enum Grant {
    /// Auth is off: everything.
    Everything,
    /// A configured token.
    Token {
        name: String,
        read: Vec<String>,
        write: Vec<String>,
        admin: bool,
    },
}

impl Grant {
    pub(crate) fn name(&self) -> &str {
        match self {
            Self::Everything => "anonymous",
            Self::Token { name, .. } => name,
        }
    }

    fn is_admin(&self) -> bool {
        match self {
            Self::Everything => true,
            Self::Token { admin, .. } => *admin,
        }
    }

    fn read_prefixes(&self) -> impl Iterator<Item = &str> {
        let prefixes: &[String] = match self {
            Self::Everything => &[],
            Self::Token { read, .. } => read,
        };
        prefixes
            .iter()
            .map(String::as_str)
            .chain(self.write_prefixes())
    }

    fn write_prefixes(&self) -> impl Iterator<Item = &str> {
        let prefixes: &[String] = match self {
            Self::Everything => &[],
            Self::Token { write, .. } => write,
        };
        prefixes.iter().map(String::as_str)
    }

    pub(crate) fn require_read(&self, stream: &str) -> Result<(), ApiError> {
        if self.is_admin()
            || self
                .read_prefixes()
                .any(|prefix| stream.starts_with(prefix))
        {
            Ok(())
        } else {
            Err(self.forbidden(&format!("read stream {stream:?}")))
        }
    }

    pub(crate) fn require_write(&self, stream: &str) -> Result<(), ApiError> {
        if self.is_admin()
            || self
                .write_prefixes()
                .any(|prefix| stream.starts_with(prefix))
        {
            Ok(())
        } else {
            Err(self.forbidden(&format!("write stream {stream:?}")))
        }
    }

    /// `$all` with `filter`: a read grant must cover every stream the filter can return.
    pub(crate) fn require_read_all(&self, filter: &EventFilter) -> Result<(), ApiError> {
        let covered = |prefix: &str| {
            prefix.is_empty()
                || filter
                    .stream_prefix
                    .as_deref()
                    .is_some_and(|wanted| wanted.starts_with(prefix))
                || filter
                    .category
                    .as_deref()
                    .is_some_and(|category| category.starts_with(prefix))
        };
        if self.is_admin() || self.read_prefixes().any(covered) {
            Ok(())
        } else {
            Err(self.forbidden(
                "read $all with this filter (a read grant must cover its prefix or category)",
            ))
        }
    }

    pub(crate) fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(self.forbidden(what))
        }
    }

    fn forbidden(&self, what: &str) -> ApiError {
        ApiError::new(
            ErrorCode::Forbidden,
            format!("token {:?} may not {what}", self.name()),
        )
    }
}

/// The cookie a browser signed in at `/ui/login` presents the token in (base64url, HttpOnly,
/// SameSite=Strict).
pub(crate) const TOKEN_COOKIE: &str = "factline_token";

/// The token in the request's [`TOKEN_COOKIE`], if any.
pub(crate) fn cookie_token(headers: &axum::http::HeaderMap) -> Option<String> {
    use base64::Engine as _;
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .and_then(|(_, value)| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(value)
                .ok()
        })
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

/// The `Set-Cookie` value that signs a browser in with `token`; `secure` when served over TLS.
pub(crate) fn sign_in_cookie(token: &str, secure: bool) -> String {
    use base64::Engine as _;
    let value = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.as_bytes());
    let secure = if secure { "; Secure" } else { "" };
    format!("{TOKEN_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict{secure}")
}

/// The `Set-Cookie` value that signs a browser out.
pub(crate) fn sign_out_cookie(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{TOKEN_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
}

/// The caller of a request, resolved from its `Authorization: Bearer` header — or, for `GET`
/// and `HEAD` only, from the [`TOKEN_COOKIE`] of a browser signed in at `/ui/login`. A cookie
/// never authorizes a write, so no other site can make a signed-in browser change anything
/// (besides SameSite=Strict keeping the cookie off cross-site requests).
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub(crate) Arc<Grant>);

impl std::ops::Deref for Caller {
    type Target = Grant;
    fn deref(&self) -> &Grant {
        &self.0
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(auth) = &state.auth else {
            return Ok(Self(Arc::new(Grant::Everything)));
        };
        let header = parts.headers.get(axum::http::header::AUTHORIZATION);
        let reads =
            parts.method == axum::http::Method::GET || parts.method == axum::http::Method::HEAD;
        if header.is_none()
            && reads
            && let Some(token) = cookie_token(&parts.headers)
        {
            return auth.grant(&token).map(Self).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::Unauthorized,
                    "the token this browser signed in with is no longer accepted: sign in again at /ui/login",
                )
            });
        }
        let header = header.ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "this server requires a bearer token (Authorization: Bearer <token>; browsers: sign in at /ui/login)",
            )
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::Unauthorized,
                    "the Authorization header must be \"Bearer <token>\"",
                )
            })?;
        auth.grant(token)
            .map(Self)
            .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "unknown bearer token"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const CONFIG: &str = r#"
        [[tokens]]
        name = "orders"
        token = "orders-token-0123456789"
        read = ["customer-"]
        write = ["order-"]

        [[tokens]]
        name = "ops"
        token_sha256 = "c6a7f5e3b1f8a6c3fa5bd4d7a0a1c7ad2f3c6c7b5ec0c4c1e2b1ee4a1a3c0d1e"
        admin = true
    "#;

    #[test]
    fn grants_follow_prefixes_and_write_implies_read() {
        let config = AuthConfig::from_toml(CONFIG).unwrap();
        let grant = config.grant("orders-token-0123456789").unwrap();
        assert!(grant.require_write("order-1").is_ok());
        assert!(grant.require_read("order-1").is_ok());
        assert!(grant.require_read("customer-1").is_ok());
        assert!(grant.require_write("customer-1").is_err());
        assert!(grant.require_read("invoice-1").is_err());
        assert!(grant.require_admin("tombstone").is_err());
        assert!(grant.require_read_all(&EventFilter::all()).is_err());
        assert!(
            grant
                .require_read_all(&EventFilter::all().stream_prefix("order-12"))
                .is_ok()
        );
        assert!(
            grant
                .require_read_all(&EventFilter::all().category("order"))
                .is_err(),
            "category order also matches the stream \"order\", which order- does not cover"
        );
        assert!(config.grant("orders-token-012345678").is_none());
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let short = "[[tokens]]\nname = \"a\"\ntoken = \"short\"\n";
        let error = AuthConfig::from_toml(short).unwrap_err().to_string();
        assert!(error.contains("at least 16"), "{error}");
        let both =
            "[[tokens]]\nname = \"a\"\ntoken = \"0123456789abcdefg\"\ntoken_sha256 = \"00\"\n";
        assert!(
            AuthConfig::from_toml(both)
                .unwrap_err()
                .to_string()
                .contains("exactly one")
        );
        let hex = "[[tokens]]\nname = \"a\"\ntoken_sha256 = \"zz\"\n";
        assert!(
            AuthConfig::from_toml(hex)
                .unwrap_err()
                .to_string()
                .contains("64 hex")
        );
        assert!(matches!(
            AuthConfig::from_toml(""),
            Err(AuthConfigError::TokenCount { count: 0 })
        ));
        let unknown = "[[tokens]]\nname = \"a\"\ntoken = \"0123456789abcdefg\"\nrole = \"x\"\n";
        assert!(AuthConfig::from_toml(unknown).is_err());
        let twice = "[[tokens]]\nname = \"a\"\ntoken = \"0123456789abcdefg\"\n[[tokens]]\nname = \"b\"\ntoken = \"0123456789abcdefg\"\n";
        assert!(
            AuthConfig::from_toml(twice)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }
}
