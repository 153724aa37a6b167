//! TCP connections to the agent.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Connects to `host:port`, IPv4 addresses first: the Datadog agent listens
/// on tcp4 only, and `localhost` may resolve to `::1` first.
pub async fn connect_ipv4_first(hostport: &str) -> Result<TcpStream, String> {
    let mut addresses: Vec<SocketAddr> =
        tokio::net::lookup_host(hostport).await.map_err(|e| format!("cannot resolve {hostport}: {e}"))?.collect();
    addresses.sort_by_key(|address| !address.is_ipv4());
    let mut last = format!("{hostport} resolves to no address");
    for address in addresses {
        match TcpStream::connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last = format!("{address}: {error}"),
        }
    }
    Err(last)
}
