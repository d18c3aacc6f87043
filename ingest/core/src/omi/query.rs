//! The query string of `GET /v1/trigger/listen`: who is speaking, at what sample rate, and which
//! audio timeline version the client asks for. Percent-decoded as a form (`+` is a space).
//!
//! Stricter than the pusher where a value ends up in an object key or a metric: the uid and
//! `client_kind` follow `spillway_proto::validate::id`; integers are plain ASCII digits. Names
//! the pusher does not know are ignored (a newer `listen` may add some); a known name given twice
//! is refused, since two readers could pick different copies.

use super::CloseRefusal;
use spillway_proto::validate;

/// The longest query string read; anything longer is refused before decoding.
pub const MAX_QUERY_BYTES: usize = 2048;
/// The longest `client_kind`.
pub const MAX_CLIENT_KIND_BYTES: usize = 64;
/// The sample rate when the query names none (the pusher's default).
pub const DEFAULT_SAMPLE_RATE: u32 = 8_000;
/// The `client_kind` when the query names none, or names it empty.
pub const DEFAULT_CLIENT_KIND: &str = "unknown";
/// Digits an integer parameter may have (48000 has 5; a few leading zeros are tolerated).
const MAX_INT_DIGITS: usize = 9;

/// The pusher's reason for a bad sample rate, word for word.
pub const INVALID_SAMPLE_RATE: &str = "Invalid sample rate";

/// The audio timeline version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimelineVersion {
    /// No `audio_timeline`: a 101 timestamp is arrival time minus duration, not an identity.
    V1,
    /// `audio_timeline=2`: a 101 timestamp is the projected capture start; replays repeat it.
    V2,
}

/// What a listen connection asked for, once its query is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenParams {
    /// A valid id (`spillway_proto::validate::id`): safe in an object key.
    pub uid: String,
    /// In `MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE` (8000..=48000).
    pub sample_rate: u32,
    /// Valid like a uid, at most [`MAX_CLIENT_KIND_BYTES`]; [`DEFAULT_CLIENT_KIND`] if absent.
    pub client_kind: String,
    pub timeline: TimelineVersion,
}

impl ListenParams {
    /// Parses a query string, with or without its leading `?`.
    pub fn parse(query: &str) -> Result<Self, CloseRefusal> {
        let query = query.strip_prefix('?').unwrap_or(query);
        if query.len() > MAX_QUERY_BYTES {
            return Err(CloseRefusal::policy(format!(
                "query string of {} bytes; at most {MAX_QUERY_BYTES} are read",
                query.len()
            )));
        }
        let mut uid = None;
        let mut sample_rate = None;
        let mut client_kind = None;
        let mut timeline = None;
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match name.as_ref() {
                "uid" => &mut uid,
                "sample_rate" => &mut sample_rate,
                "client_kind" => &mut client_kind,
                "audio_timeline" => &mut timeline,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(CloseRefusal::policy(format!(
                    "query parameter {name} is given more than once"
                )));
            }
        }

        let uid = uid.ok_or_else(|| CloseRefusal::policy("Missing uid"))?;
        validate::id(&uid).map_err(|e| CloseRefusal::policy(format!("Invalid uid: {e}")))?;

        let sample_rate = match sample_rate {
            None => DEFAULT_SAMPLE_RATE,
            Some(v) => parse_int(&v)
                .filter(|&r| validate::sample_rate(r).is_ok())
                .ok_or_else(|| CloseRefusal::policy(INVALID_SAMPLE_RATE))?,
        };

        let client_kind = match client_kind {
            None => DEFAULT_CLIENT_KIND.to_owned(),
            Some(v) if v.is_empty() => DEFAULT_CLIENT_KIND.to_owned(),
            Some(v) => {
                if v.len() > MAX_CLIENT_KIND_BYTES {
                    return Err(CloseRefusal::policy(format!(
                        "Invalid client_kind: {} bytes long; at most {MAX_CLIENT_KIND_BYTES}",
                        v.len()
                    )));
                }
                validate::id(&v)
                    .map_err(|e| CloseRefusal::policy(format!("Invalid client_kind: {e}")))?;
                v.into_owned()
            }
        };

        let timeline = match timeline {
            None => TimelineVersion::V1,
            Some(v) if parse_int(&v) == Some(2) => TimelineVersion::V2,
            Some(_) => {
                return Err(CloseRefusal::policy(
                    "Unsupported audio_timeline version; only 2 is supported",
                ));
            }
        };

        Ok(Self {
            uid: uid.into_owned(),
            sample_rate,
            client_kind,
            timeline,
        })
    }

    /// Whether the server must send the 202 timeline acknowledgement right after accepting.
    pub fn acks_timeline(&self) -> bool {
        self.timeline == TimelineVersion::V2
    }
}

/// A non-negative integer of plain ASCII digits (no sign, no spaces), at most 9 of them.
fn parse_int(v: &str) -> Option<u32> {
    if v.is_empty() || v.len() > MAX_INT_DIGITS || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::omi::close;

    fn refused(q: &str) -> CloseRefusal {
        ListenParams::parse(q).expect_err("must be refused")
    }

    #[test]
    fn the_url_listen_builds_is_accepted_with_the_pushers_defaults() {
        let p = ListenParams::parse("uid=user-1&sample_rate=16000").expect("accepted");
        assert_eq!(
            p,
            ListenParams {
                uid: "user-1".into(),
                sample_rate: 16_000,
                client_kind: "unknown".into(),
                timeline: TimelineVersion::V1,
            }
        );
        assert!(!p.acks_timeline());
        let p = ListenParams::parse("?uid=u").expect("accepted");
        assert_eq!(
            (p.sample_rate, p.timeline),
            (DEFAULT_SAMPLE_RATE, TimelineVersion::V1)
        );
    }

    #[test]
    fn values_are_percent_decoded_and_unknown_names_ignored() {
        let p = ListenParams::parse(
            "uid=%75ser%2D2&client_kind=omi%2Eglass&audio_timeline=2&future=x&sample_rate=48000",
        )
        .expect("accepted");
        assert_eq!(p.uid, "user-2");
        assert_eq!(p.client_kind, "omi.glass");
        assert_eq!(p.sample_rate, 48_000);
        assert!(p.acks_timeline());
        assert_eq!(
            ListenParams::parse("uid=u&client_kind=").map(|p| p.client_kind),
            Ok("unknown".into())
        );
    }

    #[test]
    fn a_bad_sample_rate_closes_1008_with_the_pushers_reason() {
        for q in [
            "uid=u&sample_rate=7999",
            "uid=u&sample_rate=48001",
            "uid=u&sample_rate=",
            "uid=u&sample_rate=-8000",
            "uid=u&sample_rate=%2B16000",
            "uid=u&sample_rate=16000.0",
            "uid=u&sample_rate=99999999999999999999",
        ] {
            let r = refused(q);
            assert_eq!(
                (r.code, r.reason.as_ref()),
                (close::POLICY, INVALID_SAMPLE_RATE),
                "{q}"
            );
        }
        assert_eq!(
            ListenParams::parse("uid=u&sample_rate=8000").map(|p| p.sample_rate),
            Ok(8000)
        );
    }

    #[test]
    fn only_timeline_version_2_is_supported() {
        for q in ["1", "3", "", "two", "v2"] {
            let r = refused(&format!("uid=u&audio_timeline={q}"));
            assert_eq!(r.code, close::POLICY, "{q}");
        }
        assert_eq!(
            ListenParams::parse("uid=u&audio_timeline=02").map(|p| p.timeline),
            Ok(TimelineVersion::V2)
        );
    }

    #[test]
    fn the_uid_follows_the_key_segment_rule() {
        assert_eq!(refused("sample_rate=8000").reason, "Missing uid");
        for q in [
            "uid=",
            "uid=..",
            "uid=a%2Fb",
            "uid=a+b",
            "uid=%C3%A9",
            "uid=%FF",
            "uid=a%00",
        ] {
            let r = refused(q);
            assert_eq!(r.code, close::POLICY, "{q}");
            assert!(r.reason.starts_with("Invalid uid"), "{q}: {}", r.reason);
        }
        let long = format!("uid={}", "x".repeat(129));
        assert!(refused(&long).reason.contains("at most 128"));
    }

    #[test]
    fn over_long_and_ambiguous_queries_are_refused() {
        let q = format!("uid=u&pad={}", "x".repeat(MAX_QUERY_BYTES));
        assert!(refused(&q).reason.starts_with("query string of"));
        let r = refused("uid=a&uid=b");
        assert_eq!(
            (r.code, r.reason.as_ref()),
            (close::POLICY, "query parameter uid is given more than once")
        );
        let kind = format!(
            "uid=u&client_kind={}",
            "k".repeat(MAX_CLIENT_KIND_BYTES + 1)
        );
        assert!(refused(&kind).reason.starts_with("Invalid client_kind"));
        assert!(
            refused("uid=u&client_kind=a%0Ab")
                .reason
                .starts_with("Invalid client_kind")
        );
    }
}
