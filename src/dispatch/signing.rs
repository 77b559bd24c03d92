//! Standard Webhooks signatures: HMAC-SHA256 over `webhook-id.webhook-timestamp.body`,
//! the id being the request's `Idempotency-Key`. Kept apart from the requests because
//! two kinds of body are signed the same way: a JSON batch in one go, and an upload
//! whose file is fed through the same HMAC in chunks (`upload::sign_file`) so it is
//! never held in memory. The specification's test vector pins the result down here.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Standard Webhooks secrets look like `whsec_<base64>`; anything else is used as is.
pub(super) fn signing_key(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// Standard Webhooks headers: HMAC-SHA256 over `id.timestamp.body`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> [(&'static str, String); 3] {
    let mut mac = signer(key, id, timestamp);
    mac.update(body);
    signature_headers(id, timestamp, mac)
}

/// An HMAC that has taken `id.timestamp.`; the body follows.
pub(super) fn signer(key: &[u8], id: &str, timestamp: i64) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac
}

pub(super) fn signature_headers(
    id: &str,
    timestamp: i64,
    mac: Hmac<Sha256>,
) -> [(&'static str, String); 3] {
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    [
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", format!("v1,{signature}")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // test vector from the Standard Webhooks specification
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        let headers = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(
            headers[2].1,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
