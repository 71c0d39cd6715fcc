//! Cgroup links made and pinned with bpf(2) directly: aya 0.14 cannot turn a
//! `cgroup/getsockopt` link into a pinnable one, so the node's four hooks
//! share this one path (a link pinned on bpffs stays attached when the
//! process that made it exits, until the pin is removed).

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// The kernel's `enum bpf_attach_type` values of the node's hooks.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub(crate) enum AttachType {
    SockOps = 3,
    Connect4 = 10,
    Connect6 = 11,
    GetSockopt = 21,
}

/// `union bpf_attr`, as words; the kernel reads the first `size` bytes.
#[repr(C, align(8))]
struct Attr([u32; 16]);

fn bpf(cmd: libc::c_long, attr: &Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr for `cmd` that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const Attr, std::mem::size_of::<Attr>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// Attaches `program` to `cgroup` as `attach` with a new link, and pins the
/// link at `pin`.
pub(crate) fn attach_and_pin(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach: AttachType,
    pin: &Path,
) -> std::io::Result<()> {
    let mut create = Attr([0; 16]);
    create.0[0] = program.as_raw_fd() as u32;
    create.0[1] = cgroup.as_raw_fd() as u32;
    create.0[2] = attach as u32;
    let fd = bpf(BPF_LINK_CREATE, &create)?;
    // SAFETY: BPF_LINK_CREATE returned a new file descriptor that we own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut obj_pin = Attr([0; 16]);
    let ptr = path.as_ptr() as u64;
    obj_pin.0[0] = ptr as u32;
    obj_pin.0[1] = (ptr >> 32) as u32;
    obj_pin.0[2] = link.as_raw_fd() as u32;
    bpf(BPF_OBJ_PIN, &obj_pin)?;
    Ok(())
}
