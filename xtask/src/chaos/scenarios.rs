//! The scenarios `cargo xtask chaos` runs, each a cluster's shape, its flags and the damage it
//! does mid-load ([`Action`], carried out by `scenario` in `mod.rs`).

/// One 2 s chunk at 8 kHz, as spooled (PCM plus a small envelope).
const CHUNK_BYTES: u64 = 32_000;

pub(super) struct Scenario {
    pub(super) name: &'static str,
    pub(super) note: &'static str,
    pub(super) uploaders: usize,
    pub(super) ingests: usize,
    pub(super) uploader_args: Vec<String>,
    pub(super) ingest_args: Vec<String>,
    pub(super) run: Action,
}

#[derive(Clone, Copy)]
pub(super) enum Action {
    KillUploader { times: u32 },
    KillIngest,
    StoreDown,
    StoreErrors,
    SpoolFull,
    ConnectionFlood,
    DeafDevice,
    DamagedSpool { flip: bool },
    SigtermDuringLoad,
    UploaderLost,
    RollingUpgrade,
}

pub(super) fn scenarios() -> Vec<Scenario> {
    let small_spool = vec![
        "--spool-max-bytes".to_owned(),
        (12 * CHUNK_BYTES + 4_000).to_string(),
    ];
    let mut drop_oldest = small_spool.clone();
    drop_oldest.extend(["--when-full".to_owned(), "drop-oldest".to_owned()]);
    vec![
        Scenario {
            uploaders: 1,
            ingests: 1,
            name: "kill -9 uploader x3",
            note: "recovery: uploader restart until ready (spool open)",
            uploader_args: vec![],
            ingest_args: vec![],
            run: Action::KillUploader { times: 3 },
        },
        Scenario {
            uploaders: 3,
            ingests: 1,
            name: "kill -9 1 of 3 uploaders, for the outage",
            note: "store failing so every spool holds acked chunks; the killed one is restarted after the outage and drains; recovery: kill until ingest acks again via the others",
            uploader_args: vec![],
            ingest_args: vec![],
            run: Action::UploaderLost,
        },
        Scenario {
            uploaders: 1,
            ingests: 1,
            name: "kill -9 ingest",
            note: "recovery: ingest restart until the first new ack",
            uploader_args: vec![],
            ingest_args: vec![],
            run: Action::KillIngest,
        },
        Scenario {
            uploaders: 1,
            ingests: 1,
            name: "store stopped, restarted",
            note: "recovery: store back until the spool is empty",
            uploader_args: vec![],
            ingest_args: vec![],
            run: Action::StoreDown,
        },
        Scenario {
            uploaders: 1,
            ingests: 1,
            name: "store answers 503 SlowDown",
            note: "recovery: store healthy until the spool is empty",
            uploader_args: vec![],
            ingest_args: vec![],
            run: Action::StoreErrors,
        },
        Scenario {
            uploaders: 1,
            ingests: 1,
            name: "spool full, --when-full reject",
            note: "store down until the spool is full; recovery: store back until drained",
            uploader_args: small_spool,
            ingest_args: vec![],
            run: Action::SpoolFull,
        },
        Scenario {
            uploaders: 1,
            ingests: 1,
            name: "spool full, --when-full drop-oldest",
            note: "drops are the policy, each counted; recovery: store back until drained",
            uploader_args: drop_oldest,
            ingest_args: vec![],
            run: Action::SpoolFull,
        },
        Scenario {
            uploaders: 1,
            ingests: 1,
            name: "flood of 200 silent connections",
            note: "recovery: until ingest closed them all (the per-source cap is lifted here: every process shares 127.0.0.1; ATTACKS.md measures the cap)",
            uploader_args: vec![],
            ingest_args: ["--idle-timeout", "2s", "--max-connections-per-ip", "1000"]
                .map(String::from)
                .to_vec(),
            run: Action::ConnectionFlood,
        },
        Scenario {
            uploaders: 1,
            ingests: 1,
            name: "a device that stops reading",
            note: "it sends 5 s, then neither reads nor sends; recovery: until ingest flushed and closed it",
            uploader_args: vec![],
            ingest_args: vec!["--idle-timeout".to_owned(), "2s".to_owned()],
            run: Action::DeafDevice,
        },
        Scenario {
            uploaders: 1,
            ingests: 1,
            name: "spool truncated at start-up",
            note: "uploader killed with a backlog, last 200 bytes of the index's log cut: record files adopted",
            uploader_args: vec![],
            ingest_args: vec![],
            run: Action::DamagedSpool { flip: false },
        },
        Scenario {
            uploaders: 1,
            ingests: 1,
            name: "spool bit-flipped at start-up",
            note: "uploader killed with a backlog, one byte of the oldest record file flipped: that chunk quarantined",
            uploader_args: vec![],
            ingest_args: vec![],
            run: Action::DamagedSpool { flip: true },
        },
        Scenario {
            uploaders: 1,
            ingests: 1,
            name: "SIGTERM ingest and uploader",
            note: "graceful restarts mid-load; recovery: both back until ready",
            uploader_args: vec![],
            ingest_args: vec![],
            run: Action::SigtermDuringLoad,
        },
        Scenario {
            uploaders: 2,
            ingests: 2,
            name: "upgrade mid-load: roll, roll back, finalize",
            note: "one at a time, SIGTERM then started from a second build (spool format 3): 2 uploaders pinned to format 2, 2 ingests; 1 uploader back to the first build and forward; the pin removed (spools marked 3); recovery: all 9 restarts. Then the first build on a format-3 spool: refused, every file untouched",
            uploader_args: vec![],
            ingest_args: vec![],
            run: Action::RollingUpgrade,
        },
    ]
}
