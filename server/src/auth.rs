//! Who may join: signed tokens (HS256 JWT), patient invite codes, TURN REST credentials.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bedside_protocol::{ConsultationId, ErrorCode, ParticipantId, Role};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a token lets its bearer do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// Enter a consultation in a role (`join`).
    Join,
    /// Take back one seat after a dropped link (`resume`).
    Resume,
}

/// The signed claims of a Bedside token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The seat's participant id for resume tokens; a random token id for join tokens.
    pub sub: String,
    pub cid: ConsultationId,
    pub role: Role,
    pub kind: TokenKind,
    pub iat: u64,
    pub exp: u64,
    /// A random token id, so that two tokens issued in the same second for the same seat differ
    /// (a resume hands out a new token and only the newest resumes the seat).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jti: String,
    /// The fleet region the consultation belongs to (`[cluster] region`, set only when the
    /// fleet has a region map): a node of another region redirects the bearer there. Absent:
    /// the region (or single server) that reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rgn: Option<String>,
}

const ISSUER: &str = "bedside";

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("token is invalid")]
    Invalid,
    #[error("token is not of the expected kind")]
    WrongKind,
}

impl TokenError {
    pub fn code(self) -> ErrorCode {
        match self {
            TokenError::Expired => ErrorCode::TokenExpired,
            TokenError::Invalid | TokenError::WrongKind => ErrorCode::InvalidToken,
        }
    }
}

/// Signs and verifies tokens with one HS256 secret.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Written into every token's `rgn` claim.
    region: Option<String>,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Tokens {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            region: None,
        }
    }

    /// Tokens that name the fleet region their consultation belongs to.
    pub fn in_region(mut self, region: &str) -> Self {
        self.region = Some(region.to_owned());
        self
    }

    /// Signs a token valid from `now` for `ttl`.
    pub fn issue(
        &self,
        kind: TokenKind,
        cid: &ConsultationId,
        role: Role,
        sub: &str,
        now: u64,
        ttl: Duration,
    ) -> String {
        let claims = Claims {
            iss: ISSUER.to_owned(),
            sub: sub.to_owned(),
            cid: cid.clone(),
            role,
            kind,
            iat: now,
            exp: now + ttl.as_secs(),
            jti: random_secret(8),
            rgn: self.region.clone(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// Verifies signature, issuer, expiry and kind.
    pub fn verify(&self, token: &str, kind: TokenKind) -> Result<Claims, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?;
        if data.claims.kind != kind {
            return Err(TokenError::WrongKind);
        }
        Ok(data.claims)
    }

    /// A resume token for one seat: valid for as long as a consultation may reasonably last;
    /// what really bounds its use is that the seat still exists.
    pub fn issue_resume(&self, cid: &ConsultationId, role: Role, pid: &ParticipantId) -> String {
        self.issue(
            TokenKind::Resume,
            cid,
            role,
            &pid.0,
            unix_now(),
            Duration::from_secs(12 * 3600),
        )
    }
}

/// Invite codes: 10 characters from an alphabet with no look-alikes (no 0/O, 1/I/L, U), about
/// 49 bits, written `XXXXX-XXXXX`. Only their SHA-256 is stored.
pub mod invite {
    use super::*;

    const ALPHABET: &[u8] = b"23456789ABCDEFGHJKMNPQRSTVWXYZ";
    const LEN: usize = 10;

    pub fn generate(rng: &mut impl Rng) -> String {
        let chars: String = (0..LEN)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect();
        format!("{}-{}", &chars[..5], &chars[5..])
    }

    /// The canonical form of what a person typed: case, spaces and dashes do not matter.
    /// `None` when it cannot be a code at all (so no lookup is spent on it).
    pub fn normalize(typed: &str) -> Option<String> {
        let code: String = typed
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        (code.len() == LEN && code.bytes().all(|b| ALPHABET.contains(&b))).then_some(code)
    }

    /// The longest region tag in front of a fleet's invite code.
    pub const MAX_TAG: usize = 4;

    /// A code for a fleet region: the region's tag in front (`EU-7K3M9-Q2XR4`). The tag says
    /// which region to ask, nothing about the consultation; the random part is as long as a
    /// single clinic's. An empty tag gives an untagged code.
    pub fn generate_tagged(rng: &mut impl Rng, tag: &str) -> String {
        let code = generate(rng);
        if tag.is_empty() {
            code
        } else {
            format!("{tag}-{code}")
        }
    }

    /// What a person typed, for a fleet with a region map: (the tag, empty if none; the
    /// canonical form of the whole code, tag included, which is what is hashed).
    pub fn normalize_tagged(typed: &str) -> Option<(String, String)> {
        let code: String = typed
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if code.len() < LEN || code.len() > LEN + MAX_TAG || !code.is_ascii() {
            return None;
        }
        let (tag, random) = code.split_at(code.len() - LEN);
        let ok = random.bytes().all(|b| ALPHABET.contains(&b))
            && tag.bytes().all(|b| b.is_ascii_alphanumeric());
        ok.then(|| (tag.to_owned(), code.clone()))
    }

    /// What the store keeps instead of the code.
    pub fn hash(normalized: &str) -> [u8; 32] {
        Sha256::digest(normalized.as_bytes()).into()
    }
}

/// A random secret, hex-encoded.
pub fn random_secret(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill(&mut buf[..]);
    hex::encode(buf)
}

/// A random identifier with a readable prefix (`c-…` consultations, `p-…` participants).
pub fn random_id(prefix: &str) -> String {
    format!("{prefix}-{}", random_secret(9))
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (ha, hb) = (Sha256::digest(a), Sha256::digest(b));
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// TURN REST API credentials (coturn's `use-auth-secret`): username `expiry:user`, password
/// base64(HMAC-SHA1(secret, username)). The relay checks them with the same function.
pub use bedside_turn::rest_credentials as turn_rest_credentials;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn cid() -> ConsultationId {
        ConsultationId("c-1".into())
    }

    #[test]
    fn tokens_round_trip_and_check_kind() {
        let t = Tokens::new(b"secret-secret-secret");
        let tok = t.issue(
            TokenKind::Join,
            &cid(),
            Role::Doctor,
            "t1",
            unix_now(),
            Duration::from_secs(60),
        );
        let claims = t.verify(&tok, TokenKind::Join).unwrap();
        assert_eq!(claims.role, Role::Doctor);
        assert_eq!(claims.cid, cid());
        assert_eq!(
            t.verify(&tok, TokenKind::Resume),
            Err(TokenError::WrongKind)
        );
    }

    #[test]
    fn expired_forged_and_garbage_tokens_are_refused() {
        let t = Tokens::new(b"secret-secret-secret");
        let old = t.issue(
            TokenKind::Join,
            &cid(),
            Role::Doctor,
            "t1",
            unix_now() - 3600,
            Duration::from_secs(60),
        );
        assert_eq!(t.verify(&old, TokenKind::Join), Err(TokenError::Expired));
        let other = Tokens::new(b"another-secret-entirely");
        let forged = other.issue(
            TokenKind::Join,
            &cid(),
            Role::Doctor,
            "t1",
            unix_now(),
            Duration::from_secs(60),
        );
        assert_eq!(t.verify(&forged, TokenKind::Join), Err(TokenError::Invalid));
        assert_eq!(
            t.verify("not.a.token", TokenKind::Join),
            Err(TokenError::Invalid)
        );
        assert_eq!(t.verify("", TokenKind::Join), Err(TokenError::Invalid));
    }

    #[test]
    fn invite_codes_normalize_and_reject_lookalikes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let code = invite::generate(&mut rng);
        assert_eq!(code.len(), 11);
        let typed = format!(" {} ", code.to_lowercase().replace('-', " "));
        assert_eq!(
            invite::normalize(&typed).unwrap(),
            code.replace('-', ""),
            "{typed}"
        );
        assert_eq!(invite::normalize("OOOOO-OOOOO"), None);
        assert_eq!(invite::normalize("ABC"), None);
        assert_ne!(invite::hash("AAAAAAAAAA"), invite::hash("AAAAAAAAAB"));
    }

    #[test]
    fn tagged_invite_codes_keep_their_region_tag_and_hash_whole() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let code = invite::generate_tagged(&mut rng, "EU");
        assert!(code.starts_with("EU-") && code.len() == 14, "{code}");
        let (tag, whole) = invite::normalize_tagged(&code.to_lowercase()).unwrap();
        assert_eq!((tag.as_str(), whole.clone()), ("EU", code.replace('-', "")));
        // An untagged code reads as one with no tag; the tag is at most four characters.
        let plain = invite::generate(&mut rng);
        assert_eq!(invite::normalize_tagged(&plain).unwrap().0, "");
        assert_eq!(invite::normalize_tagged(&format!("EUROPE{plain}")), None);
        assert_ne!(invite::hash(&whole), invite::hash(&whole[2..]));
        // Tokens carry the region only when told to.
        let t = Tokens::new(b"secret-secret-secret");
        let issue = |t: &Tokens| {
            t.issue(
                TokenKind::Join,
                &cid(),
                Role::Doctor,
                "t1",
                unix_now(),
                Duration::from_secs(60),
            )
        };
        assert_eq!(t.verify(&issue(&t), TokenKind::Join).unwrap().rgn, None);
        let eu = Tokens::new(b"secret-secret-secret").in_region("eu");
        let tok = issue(&eu);
        assert_eq!(
            t.verify(&tok, TokenKind::Join).unwrap().rgn.as_deref(),
            Some("eu")
        );
    }

    #[test]
    fn turn_credentials_match_coturn_rest_form() {
        // Vector computed independently: printf '1700000600:alice' | openssl dgst -sha1 -hmac
        // 'north' -binary | base64
        let (user, pass) =
            turn_rest_credentials("north", "alice", Duration::from_secs(600), 1_700_000_000);
        assert_eq!(user, "1700000600:alice");
        assert_eq!(pass, "gthUwOpcRoLI0MMCziCEBOWYnpo=");
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
