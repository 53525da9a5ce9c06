//! Transparent interception: the address a redirected connection was really meant for.
//!
//! `keel-proxy init` makes netfilter REDIRECT the pod's TCP to the proxy's listeners; the
//! connection's original destination survives in conntrack and is read back with
//! `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6).
//!
//! This module must never guess a destination: a connection whose original destination cannot
//! be read, or that was addressed to the proxy's own listener (a loop), is refused by the caller.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::net::TcpStream;

/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share the value 80 (linux/netfilter_ipv4.h,
/// linux/netfilter_ipv6/ip6_tables.h).
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination the client dialled before netfilter redirected the connection here.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    match stream.local_addr()? {
        SocketAddr::V4(_) => {
            let addr: libc::sockaddr_in = sockopt(fd, libc::SOL_IP)?;
            let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(addr.sin_port),
            )))
        }
        SocketAddr::V6(_) => {
            let addr: libc::sockaddr_in6 = sockopt(fd, libc::SOL_IPV6)?;
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(addr.sin6_addr.s6_addr),
                u16::from_be(addr.sin6_port),
                addr.sin6_flowinfo,
                addr.sin6_scope_id,
            )))
        }
    }
}

/// Reads the `SO_ORIGINAL_DST` option at `level` into a socket address structure `T`
/// (`sockaddr_in` or `sockaddr_in6`, plain C structs for which all-zero bytes are valid).
fn sockopt<T: Copy>(fd: std::os::fd::RawFd, level: libc::c_int) -> io::Result<T> {
    let mut addr = MaybeUninit::<T>::zeroed();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `addr` is a writable buffer of `len` bytes, as getsockopt requires.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            addr.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getsockopt succeeded; the struct was zeroed and the kernel filled it.
    Ok(unsafe { addr.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;

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
