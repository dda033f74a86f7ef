//! Anonymous memory advised for transparent huge pages, for buffers that are streamed whole:
//! resident weights and the benchmarks' DRAM probes and weight pools.
//!
//! Where the kernel's THP mode is `madvise` (the dev VM's), a plain `Vec` gets 4 KiB pages.
//! Streaming reads then pay a TLB miss per 4 KiB: on the dev VM the decode GEMV read
//! 3072-wide bf16 weights at 23.1-23.4 GB/s from 4 KiB pages against 24.1-25.3 GB/s from
//! huge pages, in alternating runs (`timing cold`). A probe or a benchmark on small pages would
//! measure the paging, not the memory.

use bytemuck::Pod;

/// `len` elements of `T` in anonymous memory advised for huge pages, zero-filled.
pub struct HugeBuf<T: Pod> {
    map: memmap2::MmapMut,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Pod> HugeBuf<T> {
    /// Zeroed memory for `len` elements (the mapping is at least one byte).
    pub fn zeroed(len: usize) -> std::io::Result<HugeBuf<T>> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .ok_or_else(|| std::io::Error::other(format!("{len} elements overflow usize bytes")))?;
        let map = memmap2::MmapMut::map_anon(bytes.max(1))?;
        #[cfg(target_os = "linux")]
        {
            // Advice only: without huge pages the memory works the same, only slower to stream.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(HugeBuf {
            map,
            len,
            _t: std::marker::PhantomData,
        })
    }

    /// The bytes behind the elements (the mapping may be longer).
    pub fn bytes(&self) -> &[u8] {
        &self.map[..self.len * size_of::<T>()]
    }

    /// The bytes behind the elements, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map[..self.len * size_of::<T>()]
    }
}

impl<T: Pod> std::ops::Deref for HugeBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // A page-aligned mapping is aligned for any Pod type.
        bytemuck::cast_slice(self.bytes())
    }
}

impl<T: Pod> std::ops::DerefMut for HugeBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(self.bytes_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_buf_is_zeroed_writable_and_typed() {
        let mut b = HugeBuf::<f32>::zeroed(1000).unwrap();
        assert_eq!(b.len(), 1000);
        assert!(b.iter().all(|&x| x == 0.0));
        b[999] = 2.5;
        assert_eq!(b.bytes().len(), 4000);
        assert_eq!(b.bytes()[3996..], 2.5f32.to_le_bytes());
        assert_eq!(HugeBuf::<u16>::zeroed(0).unwrap().len(), 0);
    }
}
