//! Bearer tokens for every Cairn interface: the scope model carried in a JWT's `cairn` claim,
//! verification of incoming tokens (signature, `exp`, `nbf`, `aud`, `iss`; `alg: none` never
//! verifies) and minting of the short-lived tokens the request processor hands to handlers.
//!
//! Scopes: `read` and `write` are lists of key prefixes (`p` allows `p` and every key below it,
//! `"*"` every key), `submit` lists handler names (`"*"` any), and `admin` opens dead letters,
//! streams and every request. Transports only extract the token and map [`AuthError`] and
//! [`Denied`] to 401/`UNAUTHENTICATED` and 403/`PERMISSION_DENIED`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The scopes of one token (the JWT's `cairn` claim).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scopes {
    pub read: Vec<String>,
    pub write: Vec<String>,
    pub submit: Vec<String>,
    pub admin: bool,
}

/// Who is calling and what they may do. With auth off every caller is [`Grant::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token's `sub` (empty if it has none); `None` when auth is off.
    pub subject: Option<String>,
    scopes: Option<Scopes>,
}

/// A valid token asked for something outside its scopes; the message names what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

impl cairn_error::ServiceError for Denied {
    fn kind(&self) -> cairn_error::ErrorKind {
        cairn_error::ErrorKind::Forbidden
    }
}

impl cairn_error::ServiceError for AuthError {
    fn kind(&self) -> cairn_error::ErrorKind {
        cairn_error::ErrorKind::Unauthenticated
    }
}

/// Why a token was not accepted. Messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a bearer token is required (Authorization: Bearer …)")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Whether `key` lies in the subtree of one of `prefixes`.
fn covers(prefixes: &[String], key: &str) -> bool {
    prefixes.iter().any(|p| {
        p == "*"
            || key == p
            || (key.len() > p.len() && key.starts_with(p.as_str()) && key.as_bytes()[p.len()] == b'.')
    })
}

impl Grant {
    /// Everything allowed: auth is off.
    pub fn open() -> Grant {
        Grant { subject: None, scopes: None }
    }

    pub fn from_scopes(subject: impl Into<String>, scopes: Scopes) -> Grant {
        Grant { subject: Some(subject.into()), scopes: Some(scopes) }
    }

    pub fn scopes(&self) -> Option<&Scopes> {
        self.scopes.as_ref()
    }

    pub fn can_read(&self, key: &str) -> bool {
        self.scopes.as_ref().is_none_or(|s| s.admin || covers(&s.read, key))
    }

    pub fn can_write(&self, key: &str) -> bool {
        self.scopes.as_ref().is_none_or(|s| s.admin || covers(&s.write, key))
    }

    pub fn is_admin(&self) -> bool {
        self.scopes.as_ref().is_none_or(|s| s.admin)
    }

    pub fn can_submit(&self, handler: &str) -> bool {
        self.scopes.as_ref().is_none_or(|s| s.admin || s.submit.iter().any(|h| h == "*" || h == handler))
    }

    pub fn read(&self, key: &str) -> Result<(), Denied> {
        self.can_read(key).then_some(()).ok_or_else(|| Denied(format!("the token may not read key {key:?}")))
    }

    pub fn write(&self, key: &str) -> Result<(), Denied> {
        self.can_write(key)
            .then_some(())
            .ok_or_else(|| Denied(format!("the token may not write key {key:?}")))
    }

    pub fn admin(&self, what: &str) -> Result<(), Denied> {
        self.is_admin().then_some(()).ok_or_else(|| Denied(format!("{what} needs an admin token")))
    }

    pub fn submit(&self, handler: &str) -> Result<(), Denied> {
        self.can_submit(handler)
            .then_some(())
            .ok_or_else(|| Denied(format!("the token may not submit to handler {handler:?}")))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    cairn: Scopes,
}

/// Auth settings shared by the services: flags or `CAIRN_AUTH_*` variables.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AuthConfig {
    /// HS256 secret that signs bearer tokens; also signs the processor's per-request tokens.
    /// With neither this nor a public key the service runs open.
    #[arg(long = "auth-jwt-secret", env = "CAIRN_AUTH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key (RSA, EC P-256 or Ed25519) that verifies RS256, ES256 or EdDSA tokens.
    #[arg(long = "auth-jwt-public-key-file", env = "CAIRN_AUTH_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `aud` of every token, when set.
    #[arg(long = "auth-jwt-audience", env = "CAIRN_AUTH_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` of every token, when set.
    #[arg(long = "auth-jwt-issuer", env = "CAIRN_AUTH_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
}

/// A configuration error, naming the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("CAIRN_AUTH_JWT_SECRET is empty")]
    EmptySecret,
    #[error("cannot read CAIRN_AUTH_JWT_PUBLIC_KEY_FILE={path}: {error}")]
    Read { path: String, error: String },
    #[error("CAIRN_AUTH_JWT_PUBLIC_KEY_FILE={path} holds no RSA, EC (P-256) or Ed25519 public key in PEM")]
    Pem { path: String },
}

/// Checks bearer tokens. Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    /// One decoding key per accepted algorithm.
    keys: Vec<(Algorithm, DecodingKey)>,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algs: Vec<_> = self.inner.keys.iter().map(|(a, _)| a).collect();
        f.debug_struct("Verifier").field("algorithms", &algs).finish_non_exhaustive()
    }
}

impl AuthConfig {
    /// The verifier, or `None` when no key is configured (the service runs open).
    pub fn verifier(&self) -> Result<Option<Verifier>, ConfigError> {
        let mut keys = Vec::new();
        if let Some(secret) = &self.jwt_secret {
            if secret.is_empty() {
                return Err(ConfigError::EmptySecret);
            }
            keys.push((Algorithm::HS256, DecodingKey::from_secret(secret.as_bytes())));
        }
        if let Some(path) = &self.jwt_public_key_file {
            let shown = path.display().to_string();
            let pem = std::fs::read(path)
                .map_err(|e| ConfigError::Read { path: shown.clone(), error: e.to_string() })?;
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (Algorithm::RS256, k)
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (Algorithm::ES256, k)
            } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
                (Algorithm::EdDSA, k)
            } else {
                return Err(ConfigError::Pem { path: shown });
            };
            keys.push(key);
        }
        if keys.is_empty() {
            return Ok(None);
        }
        Ok(Some(Verifier {
            inner: Arc::new(Inner {
                keys,
                audience: self.jwt_audience.clone(),
                issuer: self.jwt_issuer.clone(),
            }),
        }))
    }

    /// The signer of per-request tokens: only with an HS256 secret.
    pub fn minter(&self) -> Option<Minter> {
        let secret = self.jwt_secret.as_deref().filter(|s| !s.is_empty())?;
        Some(Minter {
            key: EncodingKey::from_secret(secret.as_bytes()),
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
        })
    }
}

/// Builds the verifier and logs the one start-up warning when there is none.
pub fn verifier_or_warn(config: &AuthConfig, service: &str) -> Result<Option<Verifier>, ConfigError> {
    let verifier = config.verifier()?;
    if verifier.is_none() {
        tracing::warn!(
            service,
            "auth is off: no CAIRN_AUTH_JWT_SECRET or CAIRN_AUTH_JWT_PUBLIC_KEY_FILE, every caller may do everything"
        );
    }
    Ok(verifier)
}

impl Verifier {
    /// Checks `token` and returns what it grants.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let Some((alg, key)) = self.inner.keys.iter().find(|(alg, _)| *alg == header.alg) else {
            return Err(AuthError::Invalid(format!("algorithm {:?} is not accepted", header.alg)));
        };
        let mut validation = Validation::new(*alg);
        validation.leeway = 5;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        required.extend(self.inner.audience.as_ref().map(|_| "aud"));
        required.extend(self.inner.issuer.as_ref().map(|_| "iss"));
        validation.set_required_spec_claims(&required);
        match &self.inner.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.inner.issuer {
            validation.set_issuer(&[iss]);
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok(Grant::from_scopes(data.claims.sub, data.claims.cairn))
    }

    /// Verifies the token of an `Authorization` header value (`Bearer …`).
    pub fn verify_header(&self, value: Option<&str>) -> Result<Grant, AuthError> {
        let value = value.ok_or(AuthError::Missing)?;
        let token = bearer(value)
            .ok_or_else(|| AuthError::Invalid("Authorization is not `Bearer <token>`".into()))?;
        self.verify(token)
    }
}

/// The token of an `Authorization: Bearer <token>` value (scheme case-insensitive).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Signs per-request tokens (HS256 with the shared secret).
#[derive(Clone)]
pub struct Minter {
    key: EncodingKey,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter").finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    exp: u64,
    nbf: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    cairn: Scopes,
}

impl Minter {
    /// A token that may read and write `key`'s subtree and nothing else, valid for `ttl_secs`.
    pub fn progress_token(&self, subject: &str, key: &str, ttl_secs: u64) -> String {
        let scopes = Scopes { read: vec![key.to_owned()], write: vec![key.to_owned()], ..Scopes::default() };
        self.token(subject, scopes, ttl_secs)
    }

    /// A token with `scopes`, valid for `ttl_secs` from now.
    pub fn token(&self, subject: &str, scopes: Scopes, ttl_secs: u64) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let claims = MintedClaims {
            sub: subject,
            exp: now + ttl_secs.max(1),
            nbf: now,
            aud: self.audience.as_deref(),
            iss: self.issuer.as_deref(),
            cairn: scopes,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .expect("HS256 signing of serialisable claims cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
    }

    fn config() -> AuthConfig {
        AuthConfig { jwt_secret: Some("s3cret".into()), ..AuthConfig::default() }
    }

    fn sign(claims: serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn prefixes_cover_their_subtree_only() {
        let p = vec!["_portal".to_owned()];
        assert!(covers(&p, "_portal"));
        assert!(covers(&p, "_portal.job1.x"));
        assert!(!covers(&p, "_portalx"));
        assert!(!covers(&p, "other"));
        assert!(covers(&["*".to_owned()], "anything.at.all"));
        assert!(!covers(&[], "a"));
    }

    #[test]
    fn scopes_decide_each_action() {
        let g = Grant::from_scopes(
            "ci",
            Scopes {
                read: vec!["_portal".into()],
                write: vec!["_portal.job1".into()],
                submit: vec!["echo".into()],
                admin: false,
            },
        );
        assert!(g.read("_portal.job2").is_ok());
        assert!(g.write("_portal.job2").is_err());
        assert!(g.write("_portal.job1.step").is_ok());
        assert!(g.submit("echo").is_ok());
        assert_eq!(g.submit("sh").unwrap_err().to_string(), "the token may not submit to handler \"sh\"");
        assert!(g.admin("dead letters").is_err());
        let admin = Grant::from_scopes("root", Scopes { admin: true, ..Scopes::default() });
        assert!(admin.read("x").is_ok() && admin.write("x").is_ok() && admin.submit("x").is_ok());
        assert!(Grant::open().admin("x").is_ok());
    }

    #[test]
    fn a_good_token_grants_its_claims() {
        let v = config().verifier().unwrap().unwrap();
        let t = sign(
            json!({"sub": "ci", "exp": now() + 60, "cairn": {"read": ["a"], "submit": ["*"]}}),
            "s3cret",
        );
        let g = v.verify_header(Some(&format!("Bearer {t}"))).unwrap();
        assert_eq!(g.subject.as_deref(), Some("ci"));
        assert!(g.can_read("a.b") && !g.can_write("a") && g.can_submit("x"));
    }

    #[test]
    fn bad_tokens_are_refused() {
        let v = config().verifier().unwrap().unwrap();
        let refused = |t: &str| v.verify(t).unwrap_err();
        assert!(
            matches!(refused(&sign(json!({"exp": now() - 60}), "s3cret")), AuthError::Invalid(m) if m.contains("xpired"))
        );
        assert!(matches!(
            refused(&sign(json!({"exp": now() + 600, "nbf": now() + 300}), "s3cret")),
            AuthError::Invalid(_)
        ));
        assert!(matches!(refused(&sign(json!({"exp": now() + 60}), "other")), AuthError::Invalid(_)));
        assert!(matches!(refused(&sign(json!({"sub": "no-exp"}), "s3cret")), AuthError::Invalid(_)));
        // alg none: header {"alg":"none"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(matches!(refused(none), AuthError::Invalid(_)));
        assert_eq!(v.verify_header(None).unwrap_err(), AuthError::Missing);
        assert!(v.verify_header(Some("Basic abc")).is_err());
        // Unknown scope names are an error, not silently ignored.
        assert!(v.verify(&sign(json!({"exp": now() + 60, "cairn": {"reed": ["a"]}}), "s3cret")).is_err());
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let v = AuthConfig { jwt_audience: Some("cairn".into()), jwt_issuer: Some("idp".into()), ..config() }
            .verifier()
            .unwrap()
            .unwrap();
        let exp = now() + 60;
        assert!(v.verify(&sign(json!({"exp": exp, "aud": "cairn", "iss": "idp"}), "s3cret")).is_ok());
        assert!(v.verify(&sign(json!({"exp": exp, "aud": "other", "iss": "idp"}), "s3cret")).is_err());
        assert!(v.verify(&sign(json!({"exp": exp, "aud": "cairn", "iss": "evil"}), "s3cret")).is_err());
        assert!(v.verify(&sign(json!({"exp": exp}), "s3cret")).is_err());
    }

    #[test]
    fn minted_tokens_write_only_their_subtree() {
        let c = AuthConfig { jwt_audience: Some("cairn".into()), ..config() };
        let t = c.minter().unwrap().progress_token("request:1", "_requests.1", 60);
        let g = c.verifier().unwrap().unwrap().verify(&t).unwrap();
        assert!(g.can_write("_requests.1.step") && !g.can_write("_requests.2") && !g.is_admin());
    }

    #[test]
    fn no_key_means_open_and_bad_keys_are_named() {
        assert!(AuthConfig::default().verifier().unwrap().is_none());
        let empty = AuthConfig { jwt_secret: Some(String::new()), ..AuthConfig::default() };
        assert!(empty.verifier().unwrap_err().to_string().contains("CAIRN_AUTH_JWT_SECRET"));
        let missing =
            AuthConfig { jwt_public_key_file: Some("/nonexistent.pem".into()), ..AuthConfig::default() };
        assert!(missing.verifier().unwrap_err().to_string().contains("CAIRN_AUTH_JWT_PUBLIC_KEY_FILE"));
    }

    #[test]
    fn bearer_values_parse() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Token abc"), None);
    }
}
