//! Transparent interception: the address a redirected connection was really meant for.
//!
//! `keel-proxy init` makes netfilter REDIRECT the pod's TCP to the proxy's listeners; the
//! connection's original destination survives in conntrack and is read back with
//! `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6), through socket2.
//!
//! This module must never guess a destination: a connection whose original destination cannot
//! be read, or that was addressed to the proxy's own listener (a loop), is refused by the caller.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use socket2::SockRef;

/// The destination the client dialled before netfilter redirected the connection here.
///
/// The option's level follows the connection's family, not the listening socket's: on a
/// dual-stack IPv6 socket an IPv4 client shows up as an IPv4-mapped address (`::ffff:a.b.c.d`)
/// and its conntrack entry is IPv4, so it is read at `SOL_IP` and returned as IPv4.
pub fn original_dst(socket: &impl AsFd) -> io::Result<SocketAddr> {
    let socket = SockRef::from(socket);
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))?;
    let ipv4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let original = if ipv4 {
        socket.original_dst_v4()?
    } else {
        socket.original_dst_v6()?
    };
    original.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the original destination is not an IP address",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        // Without a conntrack NAT entry the kernel answers ENOENT; either way it is an error,
        // never a made-up address.
        match original_dst(&server) {
            Err(_) => {}
            Ok(dst) => assert_eq!(dst, addr, "only the real local address may come back"),
        }
    }
}
