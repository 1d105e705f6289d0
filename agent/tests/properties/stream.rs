//! The live stream's query string (`stream::Query::parse`).
use hotplug_agent::report::stream::{Query, QueryError, Replay};
use proptest::{collection::vec, option, prelude::*, sample::select};

use crate::{check, ensure};

/// A query a client could mean, and how it writes each parameter.
fn query() -> impl Strategy<Value = (Query, String)> {
    let replay = prop_oneof![
        Just(Replay::None),
        Just(Replay::All),
        any::<usize>().prop_map(Replay::Last)
    ];
    let follow = (any::<bool>(), select(&[0usize, 1, 2][..]));
    let kinds = vec(
        select(&["cpu", "memory_block", "episode", "verify", "agent", "loss"][..]),
        0..4,
    );
    // Seconds within jiff's range, nanoseconds, and an offset the client writes it in.
    let since = option::of((
        -377_705_116_800i64 + 86_400..253_402_207_200 - 86_400,
        0i32..1_000_000_000,
        -17i8..=17,
    ));
    (replay, follow, kinds, since).prop_map(|(replay, (follow, spelling), kinds, since)| {
        let mut parts: Vec<(String, String)> = Vec::new();
        match replay {
            Replay::None => {}
            Replay::All => parts.push(("replay".into(), "all".into())),
            Replay::Last(n) => parts.push(("replay".into(), n.to_string())),
        }
        let words = if follow {
            ["1", "true", "yes"]
        } else {
            ["0", "false", "no"]
        };
        parts.push(("follow".into(), words[spelling].into()));
        if !kinds.is_empty() {
            parts.push(("kind".into(), kinds.join(",")));
        }
        let since = since.map(|(secs, nanos, hours)| {
            let at = jiff::Timestamp::new(secs, nanos).expect("in range");
            let offset = jiff::tz::Offset::from_hours(hours).expect("in range");
            parts.push(("since".into(), at.display_with_offset(offset).to_string()));
            at
        });
        let text = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&parts)
            .finish();
        let q = Query {
            replay,
            follow,
            kinds: kinds.into_iter().map(String::from).collect(),
            since,
        };
        (q, text)
    })
}

#[test]
fn queries_from_the_model_parse_to_the_model() {
    check("stream_query_model", 3000, query(), |(want, text)| {
        let got = Query::parse(&text);
        ensure!(
            got.as_ref() == Ok(&want),
            "{text:?}: {got:?}, want {want:?}"
        );
        Ok(())
    });
}

#[test]
fn any_query_is_parsed_or_refused_naming_the_parameter() {
    let text = prop_oneof![
        any::<String>(),
        (
            select(&["replay", "follow", "kind", "since", "x", ""][..]),
            any::<String>()
        )
            .prop_map(|(k, v)| {
                form_urlencoded::Serializer::new(String::new())
                    .append_pair(k, &v)
                    .finish()
            }),
        vec(
            select(
                &[
                    "replay=",
                    "since=",
                    "2026-01-02T03:04:05",
                    ".5",
                    "Z",
                    "+05:00",
                    "%2B",
                    "&",
                    "=",
                    "%",
                    "all",
                    "-1",
                    "follow=2"
                ][..]
            ),
            0..8
        )
        .prop_map(|p| p.concat()),
    ];
    check("stream_query_any", 6000, text, |text| {
        let decoded: Vec<(String, String)> = form_urlencoded::parse(text.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        match Query::parse(&text) {
            Ok(_) => {}
            Err(QueryError::Unknown(k)) => ensure!(
                decoded.iter().any(|(dk, _)| *dk == k),
                "{k:?} not in {text:?}"
            ),
            Err(
                QueryError::Replay(v) | QueryError::Follow(v) | QueryError::Since { value: v, .. },
            ) => {
                ensure!(
                    decoded.iter().any(|(_, dv)| *dv == v),
                    "{v:?} not in {text:?}"
                )
            }
        }
        Ok(())
    });
}
