//! A packet capture on one interface of a pod, with a raw `AF_PACKET` socket: what a tshark on
//! the pod's veth would see, without depending on tshark. Tests search the captured bytes for
//! what must never cross the wire in the clear.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use anyhow::Context;
use keel_control_plane::demo::netns::Pod;

use crate::netns::in_pod;

/// Frames captured so far, raw (Ethernet headers included).
pub struct Capture {
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<io::Result<Vec<u8>>>>,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A raw socket receiving every frame of `interface` in the calling thread's namespace.
fn packet_socket(interface: &str) -> io::Result<OwnedFd> {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let fd = check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) })?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(interface)?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value before the fields are set.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
    check(unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    // Wake up every 50 ms to see whether to stop.
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: `timeout` is a valid timeval of the size passed.
    check(unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    Ok(socket)
}

impl Capture {
    /// Starts capturing on `interface` inside `pod`.
    pub fn start(pod: &Pod, interface: &str) -> anyhow::Result<Capture> {
        let name = interface.to_owned();
        let socket = in_pod(pod, move || packet_socket(&name))
            .with_context(|| format!("opening a packet socket on {interface} in {}", pod.name()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut captured = Vec::new();
            let mut frame = vec![0u8; 65536];
            while !stopped.load(Ordering::Relaxed) {
                // SAFETY: `frame` is a writable buffer of the length passed.
                let n = unsafe {
                    libc::recv(
                        socket.as_raw_fd(),
                        frame.as_mut_ptr().cast(),
                        frame.len(),
                        0,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) {
                        continue;
                    }
                    return Err(e);
                }
                captured.extend_from_slice(&frame[..n as usize]);
            }
            Ok(captured)
        });
        Ok(Capture {
            stop,
            reader: Some(reader),
        })
    }

    /// Stops and returns every captured byte.
    pub fn finish(mut self) -> anyhow::Result<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        let reader = self
            .reader
            .take()
            .context("the capture was already finished")?;
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("the capture thread panicked"))?
            .context("capturing")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
