//! The sidecar's global allocator: mimalloc, called the way the system allocator is.
//!
//! The `mimalloc` crate's allocator passes every layout's alignment to `mi_malloc_aligned`.
//! mimalloc 3 serves that from its plain size classes only for blocks up to 1 KiB and for
//! power-of-two blocks up to 4 KiB; any other block takes the over-allocating path, which asks
//! for `size + align - 1` bytes, often one size class up (`mi_malloc_aligned(1536, 8)` gets a
//! 1792-byte block), and marks the page as holding interior pointers. Every block mimalloc hands
//! out from `mi_malloc` is already aligned to 16 bytes when it is at least 16 bytes long (and
//! to 8 when shorter), so, like std's `System`, this allocator asks for an alignment only when
//! the layout needs more than that.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// `MI_MAX_ALIGN_SIZE` on the 64-bit targets keel builds for: the alignment of every block of
/// at least this many bytes that `mi_malloc` returns.
const MIN_ALIGN: usize = 16;

/// Whether `mi_malloc(size)` is already aligned enough for `align`: blocks shorter than 16
/// bytes are aligned to their 8-byte size class, so a short block needs `align <= size`.
#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

pub struct MiMalloc;

// SAFETY: each method forwards to the mimalloc call with the same contract, and only asks for
// no alignment when `plain` shows that mimalloc's size classes already give the layout's.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            unsafe { mi::mi_malloc(layout.size()) as *mut u8 }
        } else {
            unsafe { mi::mi_malloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            unsafe { mi::mi_zalloc(layout.size()) as *mut u8 }
        } else {
            unsafe { mi::mi_zalloc_aligned(layout.size(), layout.align()) as *mut u8 }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // mi_free finds the block's page from the pointer, aligned or not.
        unsafe { mi::mi_free(ptr as *mut c_void) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            unsafe { mi::mi_realloc(ptr as *mut c_void, new_size) as *mut u8 }
        } else {
            unsafe {
                mi::mi_realloc_aligned(ptr as *mut c_void, new_size, layout.align()) as *mut u8
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIGNS: [usize; 7] = [1, 2, 8, 16, 32, 64, 4096];
    const SIZES: [usize; 13] = [1, 7, 8, 9, 15, 16, 24, 1000, 1025, 1536, 4096, 8200, 70_000];

    fn is_aligned(ptr: *mut u8, align: usize) -> bool {
        !ptr.is_null() && (ptr as usize).is_multiple_of(align)
    }

    #[test]
    fn every_block_has_its_layouts_alignment() {
        let mut live = Vec::new();
        // Many blocks of each layout, so that a size class's later blocks are checked too,
        // not only the first one in a fresh page.
        for _ in 0..64 {
            for &align in &ALIGNS {
                for &size in &SIZES {
                    let layout = Layout::from_size_align(size, align).unwrap();
                    let ptr = unsafe { MiMalloc.alloc(layout) };
                    assert!(
                        is_aligned(ptr, align),
                        "{size} bytes at align {align}: {ptr:p}"
                    );
                    unsafe { ptr.write_bytes(0xa5, size) };
                    live.push((ptr, layout));
                }
            }
        }
        for (ptr, layout) in live {
            unsafe { MiMalloc.dealloc(ptr, layout) };
        }
    }

    // In libmimalloc-sys only with its `extended` feature; the sidecar needs them only here.
    unsafe extern "C" {
        fn mi_usable_size(p: *const c_void) -> usize;
        fn mi_good_size(size: usize) -> usize;
    }

    #[test]
    fn blocks_the_size_classes_align_come_from_them_whole() {
        // What this allocator is for: a layout that mi_malloc's size classes already align gets
        // a block of exactly its size class, not one from a larger class (mi_malloc_aligned(1536,
        // 8) has 1792 usable bytes where mi_good_size(1536) is 1536).
        for &align in &[1, 2, 8, 16] {
            for &size in SIZES.iter().filter(|&&size| align <= size) {
                let layout = Layout::from_size_align(size, align).unwrap();
                for alloc in [GlobalAlloc::alloc, GlobalAlloc::alloc_zeroed] {
                    let ptr = unsafe { alloc(&MiMalloc, layout) };
                    let usable = unsafe { mi_usable_size(ptr as *const c_void) };
                    let class = unsafe { mi_good_size(size) };
                    assert_eq!(usable, class, "{size} bytes at align {align}");
                    unsafe { MiMalloc.dealloc(ptr, layout) };
                }
            }
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_even_when_reused() {
        for &align in &ALIGNS {
            for &size in &SIZES {
                let layout = Layout::from_size_align(size, align).unwrap();
                // Dirty a block of this size class first, so the zeroed one may reuse it.
                let dirty = unsafe { MiMalloc.alloc(layout) };
                unsafe { dirty.write_bytes(0xff, size) };
                unsafe { MiMalloc.dealloc(dirty, layout) };
                let ptr = unsafe { MiMalloc.alloc_zeroed(layout) };
                assert!(
                    is_aligned(ptr, align),
                    "{size} bytes at align {align}: {ptr:p}"
                );
                let block = unsafe { std::slice::from_raw_parts(ptr, size) };
                assert!(
                    block.iter().all(|&b| b == 0),
                    "{size} bytes at align {align}"
                );
                unsafe { MiMalloc.dealloc(ptr, layout) };
            }
        }
    }

    #[test]
    fn realloc_keeps_contents_and_alignment_growing_and_shrinking() {
        for &align in &ALIGNS {
            for &from in &SIZES {
                for &to in &SIZES {
                    let layout = Layout::from_size_align(from, align).unwrap();
                    let ptr = unsafe { MiMalloc.alloc(layout) };
                    for i in 0..from {
                        unsafe { ptr.add(i).write(i as u8) };
                    }
                    let moved = unsafe { MiMalloc.realloc(ptr, layout, to) };
                    assert!(
                        is_aligned(moved, align),
                        "{from} -> {to} bytes at align {align}: {moved:p}"
                    );
                    let kept = from.min(to);
                    let block = unsafe { std::slice::from_raw_parts(moved, kept) };
                    assert!(
                        block.iter().enumerate().all(|(i, &b)| b == i as u8),
                        "{from} -> {to} bytes at align {align}"
                    );
                    let new_layout = Layout::from_size_align(to, align).unwrap();
                    unsafe { MiMalloc.dealloc(moved, new_layout) };
                }
            }
        }
    }
}
