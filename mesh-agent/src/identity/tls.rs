//! TLS 1.3 (rustls, ring) for the CA's gRPC port: the server's acceptor and the agents'
//! connector, done here rather than through tonic's TLS features so the versions, ALPN and roots
//! are exactly ours.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore, ServerConfig, crypto::ring};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// gRPC runs over HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// A TLS 1.3-only server configuration presenting `chain` with `key`.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8)),
        )?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A TLS 1.3-only client configuration trusting `roots`.
pub fn client_config(roots: Arc<RootCertStore>) -> Result<ClientConfig, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// An accepted TLS connection, as tonic's server takes it.
pub struct ServerIo(pub tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for ServerIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Opens a gRPC channel to the CA at `addr` (`host:port`) over TLS 1.3, checking the CA's
/// certificate against `roots` for `server_name`. The channel's URI says `http://` on purpose:
/// TLS is done by this connector, and tonic (were its TLS feature enabled by another crate)
/// would otherwise try to wrap an `https://` connection a second time.
pub fn channel(
    addr: &str,
    server_name: &str,
    roots: Arc<RootCertStore>,
) -> Result<tonic::transport::Channel, ConnectError> {
    let config = Arc::new(client_config(roots).map_err(|e| ConnectError(e.to_string()))?);
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| ConnectError(format!("server name {server_name:?}: {e}")))?;
    let target = addr.to_owned();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ConnectError(format!("CA address {addr:?}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(15));
    let connector = tower::service_fn(move |_: hyper::Uri| {
        let config = Arc::clone(&config);
        let name = name.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// The CA's address or TLS settings are unusable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("CA connection: {0}")]
pub struct ConnectError(pub String);
