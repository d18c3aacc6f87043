//! The uid a device's client certificate names (`--auth mtls`). The QUIC handshake has already
//! verified the certificate against `--device-ca`; this reads who it is for:
//!
//! - a SAN URI `spillway:uid:<uid>`: exactly that uid;
//! - a SAN URI `spillway:uid-prefix:<prefix>`: every uid starting with it (a gateway);
//! - else the subject's common name, as one uid.
//!
//! The value must be a valid id (`[A-Za-z0-9._-]`, 1-128 characters).

use rustls_pki_types::CertificateDer;
use spillway_proto::validate;

use super::Scope;

/// The scope the leaf certificate names, `None` when it names none (or does not parse).
pub fn scope_of(leaf: &CertificateDer<'_>) -> Option<Scope> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if let Some(uid) = uri.strip_prefix("spillway:uid:") {
                    return validate::id(uid)
                        .is_ok()
                        .then(|| Scope::Uid(uid.to_owned()));
                }
                if let Some(p) = uri.strip_prefix("spillway:uid-prefix:") {
                    return validate::id(p).is_ok().then(|| Scope::Prefix(p.to_owned()));
                }
            }
        }
    }
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    validate::id(cn).is_ok().then(|| Scope::Uid(cn.to_owned()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cert(sans: &[rcgen::SanType], cn: Option<&str>) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans.to_vec();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn a_certificate_names_a_uid_a_prefix_or_by_its_common_name() {
        assert_eq!(
            scope_of(&cert(&[uri("spillway:uid:alice")], Some("ignored"))),
            Some(Scope::Uid("alice".into()))
        );
        assert_eq!(
            scope_of(&cert(&[uri("spillway:uid-prefix:gw7-")], None)),
            Some(Scope::Prefix("gw7-".into()))
        );
        assert_eq!(
            scope_of(&cert(&[], Some("bob"))),
            Some(Scope::Uid("bob".into()))
        );
        assert_eq!(scope_of(&cert(&[uri("spillway:uid:../x")], None)), None);
        assert_eq!(scope_of(&cert(&[], Some("a/b"))), None);
        assert_eq!(scope_of(&cert(&[], None)), None);
        assert_eq!(scope_of(&CertificateDer::from(vec![0u8; 10])), None);
    }
}
