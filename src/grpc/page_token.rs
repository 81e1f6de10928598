//! Page tokens of List and ListEvents, and Watch's cursors: opaque to
//! callers, checked on the way back in.
//!
//! A token is the hex of a version byte, the RPC it pages, the cursor and a
//! tag: SHA-256, truncated to 16 bytes, over a constant of this service, all
//! of the above and the request it belongs to (ListEvents' key). A token
//! that was mistyped, cut short, made by something else or sent with another
//! key fails the tag and is refused, instead of silently restarting or
//! skipping part of a traversal. The constant is not a secret and need not
//! be: a cursor only says where to continue a read the caller may make from
//! the start anyway, so a crafted one reveals nothing.

use sha2::{Digest, Sha256};

const VERSION: u8 = 1;
const TAG_BYTES: usize = 16;
const TAG_KEY: &[u8] = b"customermapping.v1 page token";

/// What a token pages through; a List token is not a ListEvents token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Paged {
    Mappings = 1,
    Events = 2,
    /// Watch's cursors, bound to the deployment's id.
    Watch = 3,
}

/// The token for `cursor`, valid only for `paged` with the same `request`.
pub fn encode(paged: Paged, cursor: &[u8], request: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(2 + cursor.len() + TAG_BYTES);
    bytes.push(VERSION);
    bytes.push(paged as u8);
    bytes.extend_from_slice(cursor);
    let tag = tag(&bytes, request);
    bytes.extend_from_slice(&tag);
    hex::encode(bytes)
}

/// The cursor of a token this service made for `paged` and `request`;
/// `None` for anything else.
pub fn decode(paged: Paged, token: &str, request: &[u8]) -> Option<Vec<u8>> {
    let bytes = hex::decode(token).ok()?;
    let (body, tag_sent) = bytes.split_at_checked(bytes.len().checked_sub(TAG_BYTES)?)?;
    let expected = tag(body, request);
    // Not secret, so no need for constant time.
    if tag_sent != expected.as_slice() {
        return None;
    }
    match body {
        [VERSION, kind, cursor @ ..] if *kind == paged as u8 => Some(cursor.to_vec()),
        _ => None,
    }
}

fn tag(body: &[u8], request: &[u8]) -> [u8; TAG_BYTES] {
    let mut hash = Sha256::new();
    hash.update(TAG_KEY);
    // Lengths first, so that no two (body, request) pairs hash alike.
    hash.update((body.len() as u64).to_be_bytes());
    hash.update(body);
    hash.update(request);
    let digest = hash.finalize();
    let mut tag = [0; TAG_BYTES];
    tag.copy_from_slice(&digest[..TAG_BYTES]);
    tag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_decodes_only_for_what_it_was_made_for() {
        let token = encode(Paged::Events, &[1, 2, 3], b"u\0alice");
        assert_eq!(
            decode(Paged::Events, &token, b"u\0alice"),
            Some(vec![1, 2, 3])
        );
        assert_eq!(decode(Paged::Events, &token, b"u\0bob"), None);
        assert_eq!(decode(Paged::Mappings, &token, b"u\0alice"), None);
        assert_eq!(decode(Paged::Events, &token[2..], b"u\0alice"), None);
        assert_eq!(decode(Paged::Events, "", b""), None);
        assert_eq!(decode(Paged::Events, "zz", b""), None);
        let mut flipped = token.into_bytes();
        flipped[6] = if flipped[6] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).expect("hex");
        assert_eq!(decode(Paged::Events, &flipped, b"u\0alice"), None);
    }
}
