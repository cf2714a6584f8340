//! A CA and a server certificate for `localhost`, generated when a local cluster is created.

use super::error::{Error, Result};

/// The last octets of the loopback addresses (`127.0.0.<n>`) that branch endpoints of the
/// local Lakebase listen on, each with the cluster's port; the server certificate names them.
pub(crate) const BRANCH_HOSTS: std::ops::RangeInclusive<u8> = 2..=63;

/// PEM texts of a fresh CA and a server certificate it signed.
pub(crate) struct ServerCerts {
    pub(crate) ca_pem: String,
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
}

pub(crate) fn generate() -> Result<ServerCerts> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let fail = |e: rcgen::Error| Error::LocalServer {
        what: "cannot generate the TLS certificates".into(),
        source: Some(Box::new(e)),
    };

    let ca_key = KeyPair::generate().map_err(fail)?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "dal local PostgreSQL CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(fail)?;

    let key = KeyPair::generate().map_err(fail)?;
    // The loopback addresses of the local Lakebase's branch endpoints too.
    let names: Vec<String> = [
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ]
    .into_iter()
    .chain(BRANCH_HOSTS.map(|n| format!("127.0.0.{n}")))
    .collect();
    let mut server = CertificateParams::new(names).map_err(fail)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let issuer = Issuer::new(ca, ca_key);
    let cert = server.signed_by(&key, &issuer).map_err(fail)?;

    Ok(ServerCerts {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

impl ServerCerts {
    /// The TLS configuration of a server that answers with this certificate.
    #[cfg(test)]
    pub(crate) fn server_config(&self) -> Result<rustls::ServerConfig> {
        server_config(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
    }
}

/// The TLS configuration of a front that answers with the cluster's own certificate.
pub(crate) fn server_tls(
    pg: &super::LocalPostgres,
) -> Result<std::sync::Arc<rustls::ServerConfig>> {
    let data = pg.root().join("data");
    let read = |name: &str| {
        let path = data.join(name);
        std::fs::read(&path).map_err(Error::io(&path))
    };
    let tls = server_config(&read("server.crt")?, &read("server.key")?)?;
    Ok(std::sync::Arc::new(tls))
}

/// The TLS configuration of a server that answers with the certificates of `cert_pem` and
/// the key of `key_pem`.
fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |e: &dyn std::fmt::Display| {
        Error::local(format!("cannot use the server's certificate: {e}"))
    };
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(&e))?;
    rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(&e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| bad(&e))
}

/// The TLS configuration of a client of the cluster that trusts its CA only.
pub(crate) fn client_tls(ca: &std::path::Path) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(ca).map_err(Error::io(ca))?;
    let bad = |e: &dyn std::fmt::Display| Error::local(format!("cannot use the cluster's CA: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(&e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(std::sync::Arc::new(tls))
}
