//! Stream replies decoded as bytes.
//!
//! Anyone who can write to the stream decides what its entries hold, so nothing about an
//! entry's field names or values may make a reply undecodable: redis-rs's typed stream
//! replies decode field names as UTF-8, and one entry with a non-UTF-8 name would fail
//! every fetch and every reclaim that includes it, holding up the whole queue. Only the
//! reply's structure, which Redis decides, is checked here.

use redis::{ErrorKind, RedisError, Value};

/// One stream entry: its id, and its fields exactly as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawEntry {
    pub(crate) id: String,
    pub(crate) fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What `XAUTOCLAIM` returned.
#[derive(Debug)]
pub(crate) struct AutoClaim {
    pub(crate) cursor: String,
    pub(crate) entries: Vec<RawEntry>,
}

fn unexpected(what: &str, value: &Value) -> RedisError {
    RedisError::from((
        ErrorKind::UnexpectedReturnType,
        "unexpected stream reply",
        format!("{what}: {value:?}"),
    ))
}

fn bytes(value: Value) -> Result<Vec<u8>, RedisError> {
    match value {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::VerbatimString { text, .. } => Ok(text.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        other => Err(unexpected("a string", &other)),
    }
}

fn text(value: Value) -> Result<String, RedisError> {
    let b = bytes(value)?;
    String::from_utf8(b).map_err(|e| unexpected("an entry id", &Value::BulkString(e.into_bytes())))
}

fn items(value: Value) -> Result<Vec<Value>, RedisError> {
    match value {
        Value::Array(v) | Value::Set(v) => Ok(v),
        Value::Nil => Ok(Vec::new()),
        other => Err(unexpected("an array", &other)),
    }
}

/// One `[id, [field, value, ...]]`; `None` for an entry deleted while it was pending
/// (its fields come back as nil).
fn entry(value: Value) -> Result<Option<RawEntry>, RedisError> {
    let mut parts = items(value)?.into_iter();
    let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
        return Err(unexpected("an entry", &Value::Nil));
    };
    let id = text(id)?;
    let flat = match fields {
        Value::Nil => return Ok(None),
        Value::Map(pairs) => {
            let mut fields = Vec::with_capacity(pairs.len());
            for (k, v) in pairs {
                fields.push((bytes(k)?, bytes(v)?));
            }
            return Ok(Some(RawEntry { id, fields }));
        }
        other => items(other)?,
    };
    let mut fields = Vec::with_capacity(flat.len() / 2);
    let mut flat = flat.into_iter();
    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
        fields.push((bytes(k)?, bytes(v)?));
    }
    Ok(Some(RawEntry { id, fields }))
}

fn entry_list(value: Value) -> Result<Vec<RawEntry>, RedisError> {
    let mut out = Vec::new();
    for e in items(value)? {
        out.extend(entry(e)?);
    }
    Ok(out)
}

/// An `XREADGROUP` reply for one stream: nil when nothing came, else
/// `[[stream, [entry, ...]]]` (RESP2) or `{stream: [entry, ...]}` (RESP3).
pub(crate) fn read_reply(value: Value) -> Result<Vec<RawEntry>, RedisError> {
    let mut out = Vec::new();
    match value {
        Value::Nil => {}
        Value::Map(streams) => {
            for (_, entries) in streams {
                out.extend(entry_list(entries)?);
            }
        }
        other => {
            for stream in items(other)? {
                let mut parts = items(stream)?.into_iter();
                let (Some(_name), Some(entries)) = (parts.next(), parts.next()) else {
                    return Err(unexpected("a stream's entries", &Value::Nil));
                };
                out.extend(entry_list(entries)?);
            }
        }
    }
    Ok(out)
}

/// An `XAUTOCLAIM` reply: `[cursor, [entry, ...], [deleted id, ...]]` (the last part
/// from Redis 7 on; deleted entries are dropped from the pending list by Redis itself).
pub(crate) fn autoclaim_reply(value: Value) -> Result<AutoClaim, RedisError> {
    let mut parts = items(value)?.into_iter();
    let (Some(cursor), Some(entries)) = (parts.next(), parts.next()) else {
        return Err(unexpected("an XAUTOCLAIM reply", &Value::Nil));
    };
    Ok(AutoClaim {
        cursor: text(cursor)?,
        entries: entry_list(entries)?,
    })
}

/// A stream id as `(ms, seq)`, for comparing ids; `None` when it is not one.
pub(crate) fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// The most of each field a dead letter's readable summary shows.
const SUMMARY_FIELD_CHARS: usize = 1024;

/// A readable summary of an entry that is not a job, for the dead-letter stream's `job`
/// field: its fields as a JSON object, lossily decoded, each cut to a bounded length.
/// The exact bytes go to the dead letter's `fields` (see `dead_letter.lua`).
pub(crate) fn summary(fields: &[(Vec<u8>, Vec<u8>)]) -> String {
    let cut = |b: &[u8]| {
        let text = String::from_utf8_lossy(b);
        if text.chars().count() <= SUMMARY_FIELD_CHARS {
            return text.into_owned();
        }
        let head: String = text.chars().take(SUMMARY_FIELD_CHARS).collect();
        format!("{head}… ({} bytes)", b.len())
    };
    let map: serde_json::Map<String, serde_json::Value> = fields
        .iter()
        .map(|(k, v)| (cut(k), serde_json::Value::String(cut(v))))
        .collect();
    serde_json::Value::Object(map).to_string()
}

/// Decodes the `fields` value `dead_letter.lua` writes: each field name and value as
/// `<length>:<bytes>`, in order.
pub fn decode_dead_fields(mut raw: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut items = Vec::new();
    while !raw.is_empty() {
        let colon = raw.iter().position(|&b| b == b':')?;
        let len: usize = std::str::from_utf8(&raw[..colon]).ok()?.parse().ok()?;
        let rest = &raw[colon + 1..];
        items.push(rest.get(..len)?.to_vec());
        raw = &rest[len..];
    }
    if items.len() % 2 != 0 {
        return None;
    }
    let mut items = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (items.next(), items.next()) {
        out.push((k, v));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    #[test]
    fn any_bytes_in_names_and_values_decode() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(b"jobs:jobs"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk(b"1-0"),
                    Value::Array(vec![bulk(b"\xff\xfe"), bulk(b""), bulk(b""), bulk(b"\x00")]),
                ]),
                Value::Array(vec![bulk(b"2-0"), Value::Nil]),
            ]),
        ])]);
        let got = read_reply(reply).unwrap();
        assert_eq!(
            got,
            vec![RawEntry {
                id: "1-0".into(),
                fields: vec![(b"\xff\xfe".to_vec(), vec![]), (vec![], b"\x00".to_vec())],
            }]
        );
        assert!(read_reply(Value::Nil).unwrap().is_empty());
    }

    #[test]
    fn ids_compare_numerically() {
        assert!(parse_id("10-0") > parse_id("9-5"));
        assert!(parse_id("9-10") > parse_id("9-9"));
        assert_eq!(parse_id("0-0"), Some((0, 0)));
        assert_eq!(parse_id("x"), None);
    }

    #[test]
    fn summaries_are_bounded_and_dead_fields_round_trip() {
        let huge = vec![b'a'; 100_000];
        let s = summary(&[(b"\xff".to_vec(), huge)]);
        assert!(s.len() < 2 * SUMMARY_FIELD_CHARS, "{}", s.len());
        assert!(s.contains("(100000 bytes)"));
        let encoded = b"2:\xff\xfe0:3:a:b1:x";
        assert_eq!(
            decode_dead_fields(encoded).unwrap(),
            vec![
                (b"\xff\xfe".to_vec(), Vec::new()),
                (b"a:b".to_vec(), b"x".to_vec())
            ]
        );
        assert_eq!(
            decode_dead_fields(b"3:abc"),
            None,
            "a name without its value"
        );
    }
}
