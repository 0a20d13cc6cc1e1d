//! The manager's raw OS calls and their `unsafe`.

use std::ffi::CString;

/// The gid of group `name` through NSS (so LDAP/sssd groups count too).
pub(super) fn group_id(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    loop {
        let mut group = std::mem::MaybeUninit::<libc::group>::uninit();
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: `cname` is a
        // NUL-terminated string, `group` and `result` are writable
        // locations, and `buf` is writable for `buf.len()` bytes; the
        // strings getgrnam_r stores in `group` point into `buf`, which we
        // do not read. We read only `gr_gid`, and only when `result` is
        // non-null (then `group` was filled in).
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                group.as_mut_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        // SAFETY: `result` is non-null, so getgrnam_r initialized `group`.
        return Some(unsafe { group.assume_init() }.gr_gid);
    }
}
