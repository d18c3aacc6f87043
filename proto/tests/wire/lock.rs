//! The wire lock (`proto/wire.lock`, rules in `proto/WIRE.md`): every package, message, field,
//! enum, enum value, service and rpc the wire has ever carried, one line each, and the check of
//! a schema against it.
//!
//! A line is never removed from the lock: a field that leaves the schema keeps its line, and the
//! schema must then reserve its number and its name. Lines are a set: their order is free.
//!
//! ```text
//! package spillway.device.v1 file device.proto proto3
//! message spillway.device.v1.Hello
//! field spillway.device.v1.Hello.uid = 1 string singular
//! field spillway.device.v1.Ack.crc32c = 5 uint32 optional
//! field spillway.device.v1.ClientMessage.hello = 1 message:spillway.device.v1.Hello oneof:kind
//! enum spillway.device.v1.ErrorCode
//! value spillway.device.v1.ErrorCode.TOO_SLOW = 19
//! service spillway.uploader.v1.Uploader
//! rpc /spillway.uploader.v1.Uploader/PutChunk spillway.uploader.v1.PutChunkRequest -> spillway.uploader.v1.PutChunkResponse unary
//! ```

use std::collections::{HashMap, HashSet};

use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

/// What a line is about: two lines with the same key describe the same thing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A file's package, by file name.
    Package(String),
    Message(String),
    /// A field, by its message and number.
    Field(String, i32),
    Enum(String),
    /// An enum value, by its enum and number.
    Value(String, i32),
    Service(String),
    /// An rpc, by its gRPC path.
    Rpc(String),
}

/// One line of the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Package {
        package: String,
        file: String,
        syntax: String,
    },
    Message {
        name: String,
    },
    Field {
        message: String,
        name: String,
        number: i32,
        ty: String,
        label: String,
    },
    Enum {
        name: String,
    },
    Value {
        enumeration: String,
        name: String,
        number: i32,
    },
    Service {
        name: String,
    },
    Rpc {
        path: String,
        input: String,
        output: String,
        kind: String,
    },
}

impl Entry {
    pub fn key(&self) -> Key {
        match self {
            Entry::Package { file, .. } => Key::Package(file.clone()),
            Entry::Message { name } => Key::Message(name.clone()),
            Entry::Field {
                message, number, ..
            } => Key::Field(message.clone(), *number),
            Entry::Enum { name } => Key::Enum(name.clone()),
            Entry::Value {
                enumeration,
                number,
                ..
            } => Key::Value(enumeration.clone(), *number),
            Entry::Service { name } => Key::Service(name.clone()),
            Entry::Rpc { path, .. } => Key::Rpc(path.clone()),
        }
    }

    /// The entry as a line of the lock.
    pub fn line(&self) -> String {
        match self {
            Entry::Package {
                package,
                file,
                syntax,
            } => format!("package {package} file {file} {syntax}"),
            Entry::Message { name } => format!("message {name}"),
            Entry::Field {
                message,
                name,
                number,
                ty,
                label,
            } => format!("field {message}.{name} = {number} {ty} {label}"),
            Entry::Enum { name } => format!("enum {name}"),
            Entry::Value {
                enumeration,
                name,
                number,
            } => format!("value {enumeration}.{name} = {number}"),
            Entry::Service { name } => format!("service {name}"),
            Entry::Rpc {
                path,
                input,
                output,
                kind,
            } => format!("rpc {path} {input} -> {output} {kind}"),
        }
    }

    /// Parses a line written by [`Entry::line`].
    pub fn parse(line: &str) -> Result<Entry, String> {
        let words: Vec<&str> = line.split(' ').collect();
        let number = |w: &str| {
            w.parse::<i32>()
                .map_err(|_| format!("{w:?} is not a field or value number"))
        };
        let member = |w: &str| {
            w.rsplit_once('.')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| format!("{w:?} is not a full name"))
        };
        Ok(match words.as_slice() {
            ["package", package, "file", file, syntax] => Entry::Package {
                package: (*package).into(),
                file: (*file).into(),
                syntax: (*syntax).into(),
            },
            ["message", name] => Entry::Message {
                name: (*name).into(),
            },
            ["field", full, "=", n, ty, label] => {
                let (message, name) = member(full)?;
                Entry::Field {
                    message,
                    name,
                    number: number(n)?,
                    ty: (*ty).into(),
                    label: (*label).into(),
                }
            }
            ["enum", name] => Entry::Enum {
                name: (*name).into(),
            },
            ["value", full, "=", n] => {
                let (enumeration, name) = member(full)?;
                Entry::Value {
                    enumeration,
                    name,
                    number: number(n)?,
                }
            }
            ["service", name] => Entry::Service {
                name: (*name).into(),
            },
            ["rpc", path, input, "->", output, kind] => Entry::Rpc {
                path: (*path).into(),
                input: (*input).into(),
                output: (*output).into(),
                kind: (*kind).into(),
            },
            _ => return Err("not a line of the lock (see WIRE.md for its forms)".into()),
        })
    }
}

/// Reserved numbers (inclusive ranges) and names of a message or an enum.
#[derive(Debug, Clone, Default)]
struct Reserved {
    numbers: Vec<(i32, i32)>,
    names: Vec<String>,
}

impl Reserved {
    fn number(&self, n: i32) -> bool {
        self.numbers.iter().any(|&(a, b)| (a..=b).contains(&n))
    }

    fn name(&self, name: &str) -> bool {
        self.names.iter().any(|r| r == name)
    }
}

/// A compiled schema as lock entries, with what its messages and enums reserve.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    pub entries: Vec<Entry>,
    reserved: HashMap<String, Reserved>,
}

impl Schema {
    pub fn new(set: &FileDescriptorSet) -> Self {
        let mut s = Schema::default();
        for file in &set.file {
            let package = file.package().to_owned();
            s.entries.push(Entry::Package {
                package: package.clone(),
                file: file.name().to_owned(),
                // protoc leaves `syntax` empty for proto2.
                syntax: match file.syntax() {
                    "" => "proto2".to_owned(),
                    other => other.to_owned(),
                },
            });
            for m in &file.message_type {
                s.message(&package, m);
            }
            for e in &file.enum_type {
                s.enumeration(&package, e);
            }
            for service in &file.service {
                let name = format!("{package}.{}", service.name());
                s.entries.push(Entry::Service { name: name.clone() });
                for method in &service.method {
                    let kind = match (method.client_streaming(), method.server_streaming()) {
                        (false, false) => "unary",
                        (true, false) => "client-streaming",
                        (false, true) => "server-streaming",
                        (true, true) => "bidi-streaming",
                    };
                    s.entries.push(Entry::Rpc {
                        path: format!("/{name}/{}", method.name()),
                        input: method.input_type().trim_start_matches('.').to_owned(),
                        output: method.output_type().trim_start_matches('.').to_owned(),
                        kind: kind.to_owned(),
                    });
                }
            }
        }
        s
    }

    fn message(&mut self, scope: &str, m: &DescriptorProto) {
        let name = format!("{scope}.{}", m.name());
        self.entries.push(Entry::Message { name: name.clone() });
        for f in &m.field {
            let ty = match f.r#type() {
                Type::Message => format!("message:{}", f.type_name().trim_start_matches('.')),
                Type::Enum => format!("enum:{}", f.type_name().trim_start_matches('.')),
                other => scalar(other).to_owned(),
            };
            let label = if f.proto3_optional() {
                "optional".to_owned()
            } else if let Some(i) = f.oneof_index {
                let oneof = usize::try_from(i)
                    .ok()
                    .and_then(|i| m.oneof_decl.get(i))
                    .map_or("?", |o| o.name());
                format!("oneof:{oneof}")
            } else {
                match f.label() {
                    Label::Repeated => "repeated",
                    Label::Required => "required",
                    Label::Optional => "singular",
                }
                .to_owned()
            };
            self.entries.push(Entry::Field {
                message: name.clone(),
                name: f.name().to_owned(),
                number: f.number(),
                ty,
                label,
            });
        }
        self.reserved.insert(
            name.clone(),
            Reserved {
                // A message's reserved ranges end exclusively.
                numbers: m
                    .reserved_range
                    .iter()
                    .map(|r| (r.start(), r.end().saturating_sub(1)))
                    .collect(),
                names: m.reserved_name.clone(),
            },
        );
        for nested in &m.nested_type {
            self.message(&name, nested);
        }
        for e in &m.enum_type {
            self.enumeration(&name, e);
        }
    }

    fn enumeration(&mut self, scope: &str, e: &EnumDescriptorProto) {
        let name = format!("{scope}.{}", e.name());
        self.entries.push(Entry::Enum { name: name.clone() });
        for v in &e.value {
            self.entries.push(Entry::Value {
                enumeration: name.clone(),
                name: v.name().to_owned(),
                number: v.number(),
            });
        }
        self.reserved.insert(
            name,
            Reserved {
                // An enum's reserved ranges end inclusively.
                numbers: e
                    .reserved_range
                    .iter()
                    .map(|r| (r.start(), r.end()))
                    .collect(),
                names: e.reserved_name.clone(),
            },
        );
    }

    /// The schema as the lock's text, one line per entry, in declaration order.
    pub fn lines(&self) -> Vec<String> {
        self.entries.iter().map(Entry::line).collect()
    }
}

fn scalar(t: Type) -> &'static str {
    match t {
        Type::Double => "double",
        Type::Float => "float",
        Type::Int64 => "int64",
        Type::Uint64 => "uint64",
        Type::Int32 => "int32",
        Type::Fixed64 => "fixed64",
        Type::Fixed32 => "fixed32",
        Type::Bool => "bool",
        Type::String => "string",
        Type::Group => "group",
        Type::Bytes => "bytes",
        Type::Uint32 => "uint32",
        Type::Sfixed32 => "sfixed32",
        Type::Sfixed64 => "sfixed64",
        Type::Sint32 => "sint32",
        Type::Sint64 => "sint64",
        // Named types are written with their name by the caller.
        Type::Message | Type::Enum => "named",
    }
}

/// The lock's entries; comments (from `#` to the end of the line) and blank lines are skipped.
/// Errors name the line.
pub fn parse(lock: &str) -> Result<Vec<Entry>, Vec<String>> {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in lock.lines().enumerate() {
        let line = line.split_once('#').map_or(line, |(l, _)| l).trim();
        if line.is_empty() {
            continue;
        }
        match Entry::parse(line) {
            Ok(e) if !seen.insert(e.key()) => errors.push(format!(
                "wire.lock line {}: {line:?} locks what an earlier line locks",
                i + 1
            )),
            Ok(e) => entries.push(e),
            Err(why) => errors.push(format!("wire.lock line {}: {line:?}: {why}", i + 1)),
        }
    }
    if errors.is_empty() {
        Ok(entries)
    } else {
        Err(errors)
    }
}

/// Everything `schema` does that the lock forbids, in the lock's order, then the schema's
/// lines the lock does not hold yet (an addition is a reviewed update of the lock). Empty when
/// the schema keeps every rule.
pub fn check(lock: &[Entry], schema: &Schema) -> Vec<String> {
    let now: HashMap<Key, &Entry> = schema.entries.iter().map(|e| (e.key(), e)).collect();
    let mut errors = Vec::new();
    for locked in lock {
        let current = now.get(&locked.key()).copied();
        if let Some(e) = breach(locked, current, schema) {
            errors.push(e);
        }
    }
    let locked: HashSet<Key> = lock.iter().map(Entry::key).collect();
    let added: Vec<String> = schema
        .entries
        .iter()
        .filter(|e| !locked.contains(&e.key()))
        .map(|e| format!("  {}", e.line()))
        .collect();
    if !added.is_empty() {
        errors.push(format!(
            "{} line(s) of the schema are not in proto/wire.lock. Once the addition is reviewed \
             against proto/WIRE.md (absent must mean \"as before\"; a required behaviour needs \
             spillway/2 or a capability; on the uploader link, uploaders roll first), add \
             exactly:\n{}",
            added.len(),
            added.join("\n")
        ));
    }
    errors
}

/// What is wrong with the schema's `current` entry of `locked`'s key, if anything.
fn breach(locked: &Entry, current: Option<&Entry>, schema: &Schema) -> Option<String> {
    match (locked, current) {
        (Entry::Package { file, package, .. }, None) => Some(format!(
            "file {file} (package {package}) is gone: every name in it is part of v1"
        )),
        (
            Entry::Package {
                file,
                package,
                syntax,
            },
            Some(Entry::Package {
                package: p,
                syntax: s,
                ..
            }),
        ) => {
            if p != package {
                Some(format!(
                    "the package of {file} changed: locked {package}, now {p}: a package never \
                     changes within v1 (a new major version is a new package beside it)"
                ))
            } else if s != syntax {
                Some(format!(
                    "the syntax of {file} changed: locked {syntax}, now {s}: it changes what an \
                     absent field means"
                ))
            } else {
                None
            }
        }
        (Entry::Message { name }, None) => Some(format!(
            "message {name} is gone: a message is never removed within v1 (keep it, with its \
             fields' numbers and names reserved)"
        )),
        (Entry::Enum { name }, None) => Some(format!(
            "enum {name} is gone: an enum is never removed within v1 (keep it, with its values' \
             numbers and names reserved)"
        )),
        (
            Entry::Field {
                message,
                name,
                number,
                ..
            },
            None,
        ) => gone(schema, "message", message, name, *number),
        (
            Entry::Value {
                enumeration,
                name,
                number,
            },
            None,
        ) => gone(schema, "enum", enumeration, name, *number),
        (
            Entry::Field {
                message,
                name,
                number,
                ty,
                label,
            },
            Some(Entry::Field {
                name: n,
                ty: t,
                label: l,
                ..
            }),
        ) => {
            if n != name {
                Some(format!(
                    "{message} field {number} is locked as {name} and is now {n}: a number is \
                     never reused or renamed"
                ))
            } else if t != ty {
                Some(format!(
                    "{message}.{name} = {number} changed type: locked {ty}, now {t}: a number \
                     never changes type"
                ))
            } else if l != label {
                Some(format!(
                    "{message}.{name} = {number} changed label: locked {label}, now {l}: a \
                     number never changes label"
                ))
            } else {
                None
            }
        }
        (
            Entry::Value {
                enumeration,
                name,
                number,
            },
            Some(Entry::Value { name: n, .. }),
        ) if n != name => Some(format!(
            "{enumeration} value {number} is locked as {name} and is now {n}: a value is never \
             reused or renamed"
        )),
        (Entry::Service { name }, None) => Some(format!(
            "service {name} is gone: its gRPC paths never change within v1"
        )),
        (Entry::Rpc { path, .. }, None) => Some(format!(
            "rpc {path} is gone: a gRPC path never changes within v1"
        )),
        (Entry::Rpc { .. }, Some(now)) if now != locked => Some(format!(
            "rpc changed: locked `{}`, now `{}`: an rpc keeps its types and streaming within v1",
            locked.line(),
            now.line()
        )),
        _ => None,
    }
}

/// The error for a locked field or value whose number the schema no longer has: none when both
/// its number and its name are reserved (or its container is gone, reported on its own).
fn gone(schema: &Schema, kind: &str, container: &str, name: &str, number: i32) -> Option<String> {
    let reserved = schema.reserved.get(container)?;
    // Moved to another number under the same name.
    let moved = schema.entries.iter().find_map(|e| match e {
        Entry::Field {
            message,
            name: n,
            number: m,
            ..
        } if message == container && n == name => Some(*m),
        Entry::Value {
            enumeration,
            name: n,
            number: m,
        } if enumeration == container && n == name => Some(*m),
        _ => None,
    });
    if let Some(m) = moved {
        return Some(format!(
            "{container}.{name} was renumbered: locked = {number}, now = {m}: a number never \
             changes"
        ));
    }
    let missing: Vec<String> = [
        (!reserved.number(number)).then(|| format!("`reserved {number};`")),
        (!reserved.name(name)).then(|| format!("`reserved \"{name}\";`")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "{container}.{name} = {number} is gone without its number and name reserved: add {} to \
         {kind} {container}",
        missing.join(" and ")
    ))
}
