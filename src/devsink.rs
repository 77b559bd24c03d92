//! `serversync dev-sink`: being written.
pub async fn serve_until_signal(_listen: std::net::SocketAddr, _dir: std::path::PathBuf) -> anyhow::Result<()> {
    anyhow::bail!("dev-sink: not yet available")
}
