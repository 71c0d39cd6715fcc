//! Links made and pinned with bpf(2) directly: aya 0.14 cannot turn a
//! `cgroup/getsockopt` link (nor a sockmap's `sk_msg` one) into a pinnable
//! one, so the node's hooks share this one path (a link pinned on bpffs
//! stays attached when the process that made it exits, until the pin is
//! removed).

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;

/// The kernel's `enum bpf_attach_type` values of the node's hooks.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub(crate) enum AttachType {
    SockOps = 3,
    SkMsgVerdict = 7,
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

/// Attaches `program` to `target` (a cgroup, or a sockmap for `sk_msg`) as
/// `attach` with a new link, and pins the link at `pin`.
pub(crate) fn attach_and_pin(
    program: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach: AttachType,
    pin: &Path,
) -> std::io::Result<()> {
    let mut create = Attr([0; 16]);
    create.0[0] = program.as_raw_fd() as u32;
    create.0[1] = target.as_raw_fd() as u32;
    create.0[2] = attach as u32;
    let fd = bpf(BPF_LINK_CREATE, &create)?;
    // SAFETY: BPF_LINK_CREATE returned a new file descriptor that we own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let (_path, ptr) = path_ptr(pin)?;
    let mut obj_pin = Attr([0; 16]);
    obj_pin.0[0] = ptr as u32;
    obj_pin.0[1] = (ptr >> 32) as u32;
    obj_pin.0[2] = link.as_raw_fd() as u32;
    bpf(BPF_OBJ_PIN, &obj_pin)?;
    Ok(())
}

fn path_ptr(path: &Path) -> std::io::Result<(CString, u64)> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let ptr = c.as_ptr() as u64;
    Ok((c, ptr))
}

/// Whether the network-namespace link pinned at `pin` is still attached:
/// the kernel detaches it (its namespace inode reads 0) when the namespace
/// goes away, and the pin alone keeps the link.
pub(crate) fn netns_link_attached(pin: &Path) -> std::io::Result<bool> {
    let (_path, ptr) = path_ptr(pin)?;
    let mut get = Attr([0; 16]);
    get.0[0] = ptr as u32;
    get.0[1] = (ptr >> 32) as u32;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that we own.
    let link = unsafe { OwnedFd::from_raw_fd(bpf(BPF_OBJ_GET, &get)? as i32) };
    // struct bpf_link_info: type, id, prog_id, then (8-byte aligned) the
    // netns variant: netns_ino, attach_type.
    let mut info = Attr([0; 16]);
    let info_ptr = std::ptr::addr_of_mut!(info) as u64;
    let mut by_fd = Attr([0; 16]);
    by_fd.0[0] = link.as_raw_fd() as u32;
    by_fd.0[1] = std::mem::size_of::<Attr>() as u32;
    by_fd.0[2] = info_ptr as u32;
    by_fd.0[3] = (info_ptr >> 32) as u32;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &by_fd)?;
    Ok(info.0[4] != 0)
}
