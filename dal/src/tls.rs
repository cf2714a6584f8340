//! TLS for database connections: libpq's `sslmode` values on rustls with the ring provider.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Socket;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::{Error, Result, Setting};

/// How a connection uses TLS, with libpq's meanings. libpq's `allow` is not offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SslMode {
    /// No TLS. Refused for Lakebase and Aurora DSQL, which take TLS alone, but over loopback
    /// (a proxy on this machine).
    Disable,
    /// TLS when the server offers it, unverified; plain otherwise. Refused for Lakebase and
    /// Aurora DSQL, but over loopback: a server in the middle that offers no TLS would be
    /// sent the token.
    Prefer,
    /// TLS always, certificate not verified; but with a CA configured
    /// ([`Config::ssl_root_cert`](crate::Config::ssl_root_cert)), verified as under
    /// [`VerifyCa`](Self::VerifyCa), as libpq does (its documentation, "SSL Support": with a
    /// root CA file, `require` behaves as `verify-ca`), and refused by the SeaORM and sqlx
    /// pools as `verify-ca` is. A configured CA file that cannot be read is an error
    /// ([`Setting::SslRootCert`](crate::Setting::SslRootCert)), where libpq would fall back
    /// to no verification: a CA that was named is one the user meant to verify with.
    Require,
    /// TLS always, certificate chain verified, host name not checked. Needs a CA of its own
    /// ([`Config::ssl_root_cert`](crate::Config::ssl_root_cert)): anyone can get a certificate
    /// from a public CA for a name they hold, so against the public roots this mode would
    /// verify nothing, and it is refused, as libpq refuses it with `sslrootcert=system`.
    /// The SeaORM and sqlx pools refuse it in any case: sqlx trusts the public roots besides
    /// the configured CA.
    VerifyCa,
    /// TLS always, certificate chain and host name verified. The default for Lakebase and
    /// Aurora DSQL. With a configured CA, the SeaORM and sqlx pools' connections (sqlx's)
    /// also accept a certificate a public CA issued for the host name; the others trust the
    /// configured CA alone. The host name is looked for in the certificate's subject
    /// alternative names only (RFC 6125): a certificate that holds it in its Common Name
    /// alone, which libpq accepts, is refused; issue it with a `subjectAltName`.
    VerifyFull,
}

/// libpq's name of the mode, as `sslmode` takes it (`verify-full`).
impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        })
    }
}

impl std::str::FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            "allow" => {
                return Err(
                    "\"allow\" (plain first, TLS only if the server insists) is not \
                     offered: use prefer, or a mode that always uses TLS"
                        .to_owned(),
                );
            }
            _ => {
                return Err(format!(
                    "{s:?} is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }
}

impl SslMode {
    /// Whether the mode checks the server's certificate (`verify-ca`, `verify-full`): the
    /// modes that read a CA.
    pub(crate) fn verifies(self) -> bool {
        matches!(self, Self::VerifyCa | Self::VerifyFull)
    }

    pub(crate) fn for_tokio_postgres(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            Self::Disable => Pg::Disable,
            Self::Prefer => Pg::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => Pg::Require,
        }
    }

    #[cfg(feature = "seaorm")]
    pub(crate) fn for_sqlx(self) -> sea_orm::sqlx::postgres::PgSslMode {
        use sea_orm::sqlx::postgres::PgSslMode as Sqlx;
        match self {
            Self::Disable => Sqlx::Disable,
            Self::Prefer => Sqlx::Prefer,
            Self::Require => Sqlx::Require,
            Self::VerifyCa => Sqlx::VerifyCa,
            Self::VerifyFull => Sqlx::VerifyFull,
        }
    }
}

/// The TLS settings of a connector, with the rustls configuration built once.
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) mode: SslMode,
    pub(crate) root_cert: Option<PathBuf>,
    /// The CA file's contents (PEM), read once when the connector was built, under the modes
    /// that verify the server: the SeaORM pool's connections (sqlx's) trust what was read
    /// then, as the others' rustls configuration does.
    #[cfg(feature = "seaorm")]
    pub(crate) root_pem: Option<Vec<u8>>,
    pub(crate) config: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("root_cert", &self.root_cert)
            .finish()
    }
}

impl Tls {
    pub(crate) fn new(mode: SslMode, root_cert: Option<&Path>) -> Result<Self> {
        let mode = match (mode, root_cert) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            _ => mode,
        };
        let root_pem = match root_cert {
            Some(path) if mode.verifies() => {
                Some(crate::setting_file::read(path).map_err(|e| {
                    Error::config(
                        Setting::SslRootCert,
                        format!("cannot read CA certificates from {}: {e}", path.display()),
                    )
                })?)
            }
            _ => None,
        };
        if mode == SslMode::VerifyCa && root_cert.is_none() {
            return Err(Error::config(
                Setting::SslMode,
                "verify-ca checks a certificate's chain but not the name it was issued for, \
                 and with no sslrootcert (PGSSLROOTCERT) the chain would lead to the public \
                 (Mozilla) roots, from which anyone can get a certificate for a name they \
                 hold: use verify-full, or set sslrootcert to the CA that signed the server's \
                 certificate (libpq refuses verify-ca with sslrootcert=system alike)",
            ));
        }
        let ca = root_cert.zip(root_pem.as_deref());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| {
                Error::config(Setting::SslMode, format!("no TLS version available: {e}"))
            })?;
        let config = match mode {
            SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth(),
            SslMode::VerifyCa => {
                let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots(ca)?),
                    provider,
                )
                .build()
                .map_err(|e| Error::config(Setting::SslRootCert, e.to_string()))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyHostName(inner)))
                    .with_no_client_auth()
            }
            SslMode::VerifyFull => builder
                .with_root_certificates(roots(ca)?)
                .with_no_client_auth(),
        };
        Ok(Self {
            mode,
            root_cert: root_cert.map(Path::to_owned),
            #[cfg(feature = "seaorm")]
            root_pem,
            config: Arc::new(config),
        })
    }

    pub(crate) fn connector(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        tokio_postgres_rustls::MakeRustlsConnect::new((*self.config).clone())
    }
}

/// A TLS connector (`M`) or its handshake whose streams send TLS's `close_notify` when
/// dropped unclosed (see [`CloseNotifyStream`]).
pub(crate) struct CloseNotify<M>(pub(crate) M);

/// A TLS stream that sends `close_notify` when dropped unclosed, as it is when diesel-async
/// drops a connection's task. PostgreSQL logs a TLS session that ends without one as an
/// error ("could not receive data from client: Connection reset by peer":
/// `be-secure-openssl.c` reports an EOF without `close_notify` as `ECONNRESET`), at every
/// connection a pool retires; with it, the server reads an ordinary end of the session and
/// logs nothing.
pub(crate) struct CloseNotifyStream<S: AsyncWrite + Unpin> {
    inner: S,
    /// The stream was shut down (its `close_notify` sent) or failed: nothing more to send.
    done: bool,
}

impl<M> MakeTlsConnect<Socket> for CloseNotify<M>
where
    M: MakeTlsConnect<Socket>,
    M::Stream: AsyncWrite + Unpin,
    M::TlsConnect: Send + 'static,
    <M::TlsConnect as TlsConnect<Socket>>::Future: Send + 'static,
{
    type Stream = CloseNotifyStream<M::Stream>;
    type TlsConnect = CloseNotify<M::TlsConnect>;
    type Error = M::Error;

    fn make_tls_connect(
        &mut self,
        domain: &str,
    ) -> std::result::Result<Self::TlsConnect, M::Error> {
        Ok(CloseNotify(self.0.make_tls_connect(domain)?))
    }
}

impl<C> TlsConnect<Socket> for CloseNotify<C>
where
    C: TlsConnect<Socket>,
    C::Stream: AsyncWrite + Unpin,
    C::Future: Send + 'static,
{
    type Stream = CloseNotifyStream<C::Stream>;
    type Error = C::Error;
    type Future = BoxFuture<'static, std::result::Result<Self::Stream, C::Error>>;

    fn connect(self, stream: Socket) -> Self::Future {
        let handshake = self.0.connect(stream);
        Box::pin(async move {
            let inner = handshake.await?;
            Ok(CloseNotifyStream { inner, done: false })
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for CloseNotifyStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CloseNotifyStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        this.done |= matches!(polled, Poll::Ready(Err(_)));
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.done |= polled.is_ready();
        polled
    }
}

impl<S: TlsStream + AsyncWrite + Unpin> TlsStream for CloseNotifyStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

impl<S: AsyncWrite + Unpin> Drop for CloseNotifyStream<S> {
    /// Sends `close_notify` without waiting: a few bytes that an open socket takes at once.
    /// A socket that cannot take them now is closed as it is. Only TLS ends: the stream is
    /// not told where the protocol's messages end, so a `Terminate` written here could land
    /// inside one that a dropped request left half sent.
    fn drop(&mut self) {
        if !self.done {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let _ = Pin::new(&mut self.inner).poll_shutdown(&mut cx);
        }
    }
}

/// The CA certificates of `path` (PEM), or the Mozilla roots when there is none.
fn roots(ca: Option<(&Path, &[u8])>) -> Result<RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    let mut store = RootCertStore::empty();
    match ca {
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some((path, pem)) => {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| {
                    Error::config(
                        Setting::SslRootCert,
                        format!("cannot read CA certificates from {}: {e}", path.display()),
                    )
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(Error::config(
                    Setting::SslRootCert,
                    format!("{} holds no usable CA certificate", path.display()),
                ));
            }
        }
    }
    Ok(store)
}

/// `verify-ca`: the chain must lead to a trusted root; the name in it is not checked.
#[derive(Debug)]
struct AnyHostName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error as TlsError};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require`: encrypted, but any certificate is accepted (libpq's meaning).
/// Handshake signatures are still checked, so the session key belongs to the certificate.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA file larger than any (a setting pointed at a disk image, or at `/dev/zero`, which
    /// never ends) is refused as `PGSSLROOTCERT`'s, and read no further than the bound.
    #[test]
    fn a_root_cert_file_larger_than_any_is_refused() {
        let file = crate::setting_file::tests::SparseFile::too_large();
        match Tls::new(SslMode::VerifyFull, Some(&file.0)) {
            Err(Error::Config { setting, reason }) => {
                assert_eq!(setting, Setting::SslRootCert);
                assert!(reason.contains("more than 16 MiB"), "{reason}");
            }
            other => panic!("expected PGSSLROOTCERT refused, got {:?}", other.map(drop)),
        }
    }

    #[test]
    fn sslmode_shows_as_it_parses() {
        for mode in [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            assert_eq!(mode.to_string().parse::<SslMode>(), Ok(mode));
        }
    }

    #[test]
    fn sslmode_parses_libpq_names_and_names_the_choices_on_a_typo() {
        assert_eq!("verify-full".parse::<SslMode>(), Ok(SslMode::VerifyFull));
        assert_eq!("require".parse::<SslMode>(), Ok(SslMode::Require));
        let err = "verify_full".parse::<SslMode>().unwrap_err();
        assert!(err.contains("verify-full"), "{err}");
        // libpq's `allow` is named as what it is, with what to use instead.
        let err = "allow".parse::<SslMode>().unwrap_err();
        assert!(
            err.contains("not offered") && err.contains("prefer"),
            "{err}"
        );
    }

    /// libpq refuses `verify-ca` against the public roots (`sslrootcert=system`): anyone can
    /// get a publicly trusted certificate for a name they hold, and the mode checks no name.
    #[test]
    fn verify_ca_needs_a_ca_of_its_own() {
        let err = Tls::new(SslMode::VerifyCa, None).unwrap_err();
        let shown = err.to_string();
        assert!(shown.starts_with("invalid setting PGSSLMODE"), "{shown}");
        assert!(
            shown.contains("verify-full") && shown.contains("sslrootcert"),
            "{shown}"
        );
    }

    #[test]
    fn a_missing_ca_file_is_a_config_error() {
        let err =
            Tls::new(SslMode::VerifyFull, Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid setting PGSSLROOTCERT"),
            "{err}"
        );
    }
}
