//! The wire's lock (`proto/wire.lock`): the schema keeps every number, name, type and label it
//! ever had (or reserves what it removed), its package and gRPC paths, and every addition is a
//! deliberate line of the lock. The rules are `proto/WIRE.md`; the checker is `wire/lock.rs`,
//! and the broken schemas below show it catches each breach with a precise message.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

#[path = "wire/lock.rs"]
mod lock;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lock::{Entry, Schema};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The lock's entries.
fn locked() -> Vec<Entry> {
    let text = std::fs::read_to_string(root().join("wire.lock")).expect("proto/wire.lock");
    lock::parse(&text).unwrap_or_else(|e| panic!("{}", e.join("\n")))
}

/// The schema of the .proto files in `dir` (as `proto/build.rs` compiles them).
fn schema_in(dir: &Path) -> Schema {
    let set = protox::compile(["device.proto", "uploader.proto"], [dir]).expect("compiles");
    Schema::new(&set)
}

/// The sources of today's schema, by file name.
fn today() -> HashMap<String, String> {
    ["device.proto", "uploader.proto"]
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(root().join("proto").join(f)).expect("source");
            (f.to_owned(), text)
        })
        .collect()
}

/// Serves .proto sources from memory.
struct Sources(HashMap<String, String>);

impl protox::file::FileResolver for Sources {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        match self.0.get(name) {
            Some(source) => protox::file::File::from_source(name, source),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

/// Today's schema with `from` replaced by `to` in `file` (which must hold `from`), checked
/// against the lock.
fn check_edited(file: &str, edits: &[(&str, &str)]) -> Vec<String> {
    let mut sources = today();
    let text = sources.get_mut(file).expect("a schema file");
    for (from, to) in edits {
        assert!(text.contains(from), "{file} holds {from:?}");
        *text = text.replacen(from, to, 1);
    }
    let mut compiler = protox::Compiler::with_file_resolver(Sources(sources));
    compiler
        .open_files(["device.proto", "uploader.proto"])
        .expect("the edited schema compiles");
    lock::check(&locked(), &Schema::new(&compiler.file_descriptor_set()))
}

#[test]
fn the_schema_keeps_every_rule_of_its_lock() {
    let errors = lock::check(&locked(), &schema_in(&root().join("proto")));
    assert!(errors.is_empty(), "\n{}", errors.join("\n"));
}

/// Every schema the wire had agrees with the lock, line for line: no number was ever reused,
/// retyped or relabelled, so the lock is the union of the history.
#[test]
fn every_historical_schema_agrees_with_the_lock() {
    let lines: Vec<String> = locked().iter().map(Entry::line).collect();
    let dir = root().join("tests/wire/schemas");
    let mut commits: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/wire/schemas")
        .map(|e| e.expect("entry").path())
        .collect();
    commits.sort();
    assert_eq!(commits.len(), 4, "{commits:?}");
    for commit in commits {
        for line in schema_in(&commit).lines() {
            assert!(
                lines.contains(&line),
                "{}: {line:?} is not a line of the lock",
                commit.display()
            );
        }
    }
}

#[test]
fn a_field_removed_without_reserving_its_number_and_name_is_refused() {
    assert_eq!(
        check_edited("device.proto", &[("  string token = 6;\n", "")]),
        [
            "spillway.device.v1.Hello.token = 6 is gone without its number and name reserved: add \
          `reserved 6;` and `reserved \"token\";` to message spillway.device.v1.Hello"
        ]
    );
    assert_eq!(
        check_edited(
            "device.proto",
            &[("  string token = 6;\n", "  reserved 6;\n")]
        ),
        [
            "spillway.device.v1.Hello.token = 6 is gone without its number and name reserved: add \
          `reserved \"token\";` to message spillway.device.v1.Hello"
        ]
    );
    // Both reserved: the removal keeps the rules.
    assert_eq!(
        check_edited(
            "device.proto",
            &[(
                "  string token = 6;\n",
                "  reserved 6;\n  reserved \"token\";\n"
            )]
        ),
        Vec::<String>::new()
    );
}

#[test]
fn an_enum_value_removed_without_reserving_it_is_refused() {
    assert_eq!(
        check_edited("device.proto", &[("  TOO_SLOW = 19;\n", "")]),
        [
            "spillway.device.v1.ErrorCode.TOO_SLOW = 19 is gone without its number and name \
          reserved: add `reserved 19;` and `reserved \"TOO_SLOW\";` to enum \
          spillway.device.v1.ErrorCode"
        ]
    );
    assert_eq!(
        check_edited(
            "device.proto",
            &[(
                "  TOO_SLOW = 19;\n",
                "  reserved 19;\n  reserved \"TOO_SLOW\";\n"
            )]
        ),
        Vec::<String>::new()
    );
}

#[test]
fn a_retyped_or_relabelled_field_is_refused() {
    assert_eq!(
        check_edited(
            "device.proto",
            &[("uint64 resume_from = 7;", "uint32 resume_from = 7;")]
        ),
        [
            "spillway.device.v1.Hello.resume_from = 7 changed type: locked uint64, now uint32: a \
          number never changes type"
        ]
    );
    assert_eq!(
        check_edited(
            "uploader.proto",
            &[("Layout layout = 7;", "uint32 layout = 7;")]
        ),
        [
            "spillway.uploader.v1.PutChunkRequest.layout = 7 changed type: locked \
          enum:spillway.uploader.v1.Layout, now uint32: a number never changes type"
        ]
    );
    assert_eq!(
        check_edited(
            "device.proto",
            &[("optional uint32 crc32c = 5;", "uint32 crc32c = 5;")]
        ),
        [
            "spillway.device.v1.Ack.crc32c = 5 changed label: locked optional, now singular: a \
          number never changes label"
        ]
    );
}

#[test]
fn a_reused_or_moved_number_is_refused() {
    // Number 6 given to another field.
    assert_eq!(
        check_edited(
            "device.proto",
            &[("string token = 6;", "string credential = 6;")]
        ),
        [
            "spillway.device.v1.Hello field 6 is locked as token and is now credential: a number \
          is never reused or renamed"
        ]
    );
    // An enum value renumbered; 20 is new, so the lock is told of it too.
    assert_eq!(
        check_edited("device.proto", &[("TOO_SLOW = 19;", "TOO_SLOW = 20;")]),
        [
            "spillway.device.v1.ErrorCode.TOO_SLOW was renumbered: locked = 19, now = 20: a \
             number never changes",
            "1 line(s) of the schema are not in proto/wire.lock. Once the addition is reviewed \
             against proto/WIRE.md (absent must mean \"as before\"; a required behaviour needs \
             spillway/2 or a capability; on the uploader link, uploaders roll first), add \
             exactly:\n  value spillway.device.v1.ErrorCode.TOO_SLOW = 20",
        ]
    );
}

#[test]
fn the_package_and_the_grpc_path_never_change() {
    let errors = check_edited(
        "uploader.proto",
        &[(
            "package spillway.uploader.v1;",
            "package spillway.uploader.v2;",
        )],
    );
    assert_eq!(
        errors[0],
        "the package of uploader.proto changed: locked spillway.uploader.v1, now \
         spillway.uploader.v2: a package never changes within v1 (a new major version is a new \
         package beside it)"
    );
    assert!(
        errors.contains(
            &"rpc /spillway.uploader.v1.Uploader/PutChunk is gone: a gRPC path never changes \
              within v1"
                .to_owned()
        ),
        "{errors:#?}"
    );
    let errors = check_edited("uploader.proto", &[("rpc PutChunk(", "rpc Put(")]);
    assert_eq!(
        errors[0],
        "rpc /spillway.uploader.v1.Uploader/PutChunk is gone: a gRPC path never changes within v1"
    );
    assert!(
        errors[1].ends_with(
            "\n  rpc /spillway.uploader.v1.Uploader/Put spillway.uploader.v1.PutChunkRequest -> \
             spillway.uploader.v1.PutChunkResponse unary"
        ),
        "{errors:#?}"
    );
    assert_eq!(
        check_edited(
            "uploader.proto",
            &[(
                "returns (PutChunkResponse)",
                "returns (stream PutChunkResponse)"
            )]
        ),
        [
            "rpc changed: locked `rpc /spillway.uploader.v1.Uploader/PutChunk \
          spillway.uploader.v1.PutChunkRequest -> spillway.uploader.v1.PutChunkResponse unary`, \
          now `rpc /spillway.uploader.v1.Uploader/PutChunk spillway.uploader.v1.PutChunkRequest \
          -> spillway.uploader.v1.PutChunkResponse server-streaming`: an rpc keeps its types \
          and streaming within v1"
        ]
    );
}

#[test]
fn an_addition_is_refused_until_the_lock_holds_it_and_the_lines_are_printed() {
    assert_eq!(
        check_edited(
            "device.proto",
            &[(
                "  uint64 resume_from = 7;\n",
                "  uint64 resume_from = 7;\n  uint32 gain = 8;\n"
            )]
        ),
        [
            "1 line(s) of the schema are not in proto/wire.lock. Once the addition is reviewed \
          against proto/WIRE.md (absent must mean \"as before\"; a required behaviour needs \
          spillway/2 or a capability; on the uploader link, uploaders roll first), add \
          exactly:\n  field spillway.device.v1.Hello.gain = 8 uint32 singular"
        ]
    );
    // A message is removed by no one: it stays, its fields reserved.
    let errors = check_edited(
        "uploader.proto",
        &[
            ("message PutChunkResponse {", "message PutChunkAnswer {"),
            ("returns (PutChunkResponse)", "returns (PutChunkAnswer)"),
        ],
    );
    assert_eq!(
        errors[0],
        "message spillway.uploader.v1.PutChunkResponse is gone: a message is never removed \
         within v1 (keep it, with its fields' numbers and names reserved)"
    );
}

#[test]
fn a_malformed_or_repeated_lock_line_is_named() {
    assert_eq!(
        lock::parse("# comment\n\nfield spillway.device.v1.Hello.uid = one string singular\n"),
        Err(vec![
            "wire.lock line 3: \"field spillway.device.v1.Hello.uid = one string singular\": \
             \"one\" is not a field or value number"
                .to_owned()
        ])
    );
    assert_eq!(
        lock::parse("message a.B\nmessage a.B\nmessage\n"),
        Err(vec![
            "wire.lock line 2: \"message a.B\" locks what an earlier line locks".to_owned(),
            "wire.lock line 3: \"message\": not a line of the lock (see WIRE.md for its forms)"
                .to_owned(),
        ])
    );
}
