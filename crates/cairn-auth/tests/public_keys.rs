//! Tokens signed with RSA, EC P-256 and Ed25519 private keys verify against the matching PEM
//! public key in `CAIRN_AUTH_JWT_PUBLIC_KEY_FILE`, and not against another key or another
//! algorithm. The keys in `tests/keys` exist only for this test.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use cairn_auth::AuthConfig;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

fn key(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/keys").join(name)
}

fn sign(alg: Algorithm, private: &str) -> String {
    let pem = std::fs::read(key(private)).unwrap();
    let encoding = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_ed_pem(&pem),
    }
    .unwrap();
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 600;
    jsonwebtoken::encode(
        &Header::new(alg),
        &json!({"sub": "k", "exp": exp, "cairn": {"read": ["a"]}}),
        &encoding,
    )
    .unwrap()
}

fn verifier(public: &str) -> cairn_auth::Verifier {
    AuthConfig { jwt_public_key_file: Some(key(public)), ..AuthConfig::default() }
        .verifier()
        .unwrap()
        .unwrap()
}

#[test]
fn each_key_type_verifies_its_own_algorithm_only() {
    let cases = [
        (Algorithm::RS256, "rsa.pem", "rsa.pub.pem"),
        (Algorithm::ES256, "ec.pem", "ec.pub.pem"),
        (Algorithm::EdDSA, "ed25519.pem", "ed25519.pub.pem"),
    ];
    for (alg, private, public) in cases {
        let token = sign(alg, private);
        let grant = verifier(public).verify(&token).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert!(grant.can_read("a.b") && !grant.can_read("b"), "{alg:?}");
        for (_, _, other) in cases.iter().filter(|(_, _, p)| *p != public) {
            assert!(verifier(other).verify(&token).is_err(), "{alg:?} token against {other}");
        }
    }
    // A secret-signed token does not pass a public-key verifier (no algorithm confusion).
    let hs = jsonwebtoken::encode(
        &Header::default(),
        &json!({"exp": 9_999_999_999u64}),
        &EncodingKey::from_secret(&std::fs::read(key("rsa.pub.pem")).unwrap()),
    )
    .unwrap();
    assert!(verifier("rsa.pub.pem").verify(&hs).is_err());
}

#[test]
fn a_file_that_is_no_public_key_is_named() {
    let err = AuthConfig { jwt_public_key_file: Some(key("../public_keys.rs")), ..AuthConfig::default() }
        .verifier()
        .unwrap_err();
    assert!(err.to_string().contains("CAIRN_AUTH_JWT_PUBLIC_KEY_FILE"), "{err}");
}
