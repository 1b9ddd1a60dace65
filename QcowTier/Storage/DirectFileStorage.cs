using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace QcowTier.Storage;

/// <summary>
/// cache=none: a file opened with O_DIRECT. Every request is done through an aligned bounce
/// buffer when the caller's buffer, offset or length is not aligned; unaligned writes
/// read-modify-write their partial head and tail blocks. Striped reader-writer locks keep a
/// read-modify-write from writing stale bytes over a concurrent write: a block being
/// read-modify-written is held exclusively, every other block a write covers is held shared.
/// </summary>
internal sealed unsafe class DirectFileStorage : ImageStorage
{
    private const int Alignment = 4096;
    private readonly FileStorage _inner;
    private const int StripeCount = 64;
    private readonly ReaderWriterLockSlim[] _stripes = Enumerable.Range(0, StripeCount).Select(_ => new ReaderWriterLockSlim()).ToArray();

    private DirectFileStorage(FileStorage inner) => _inner = inner;

    public static DirectFileStorage Open(string path, bool writable)
    {
        SafeFileHandle handle = NativeMethods.OpenDirect(path, writable);
        return new DirectFileStorage(new FileStorage(handle, path, writable, ownsHandle: true));
    }

    public override string? Name => _inner.Name;

    public override int RequiredAlignment => Alignment;

    public override long Length => _inner.Length;

    public override bool CanWrite => _inner.CanWrite;

    private static bool IsAligned(long offset, int length, ReadOnlySpan<byte> buffer)
    {
        fixed (byte* p = buffer)
        {
            return ((offset | (uint)length | (long)(nint)p) & (Alignment - 1)) == 0;
        }
    }

    public override void Read(long offset, Span<byte> buffer)
    {
        if (IsAligned(offset, buffer.Length, buffer))
        {
            _inner.Read(offset, buffer);
            return;
        }
        var start = offset & ~(long)(Alignment - 1);
        var end = (offset + buffer.Length + Alignment - 1) & ~(long)(Alignment - 1);
        using var bounce = new AlignedBuffer(checked((int)(end - start)));
        _inner.Read(start, bounce.Span);
        bounce.Span.Slice((int)(offset - start), buffer.Length).CopyTo(buffer);
    }

    private static int Stripe(long blockOffset) => (int)((ulong)(blockOffset / Alignment) % StripeCount);

    public override void Write(long offset, ReadOnlySpan<byte> data)
    {
        if (data.IsEmpty)
        {
            return;
        }
        var start = offset & ~(long)(Alignment - 1);
        var end = (offset + data.Length + Alignment - 1) & ~(long)(Alignment - 1);
        var headPartial = offset != start;
        var tailPartial = offset + data.Length != end;
        // 1: shared (the block is only overwritten), 2: exclusive (it is read-modify-written).
        Span<byte> mode = stackalloc byte[StripeCount];
        var blocks = (end - start) / Alignment;
        if (blocks >= StripeCount)
        {
            mode.Fill(1);
        }
        else
        {
            for (var b = 0L; b < blocks; b++)
            {
                mode[Stripe(start + b * Alignment)] = 1;
            }
        }
        if (headPartial)
        {
            mode[Stripe(start)] = 2;
        }
        if (tailPartial)
        {
            mode[Stripe(end - Alignment)] = 2;
        }
        // Always in ascending stripe order, so two writers cannot deadlock.
        var taken = 0;
        try
        {
            for (; taken < StripeCount; taken++)
            {
                if (mode[taken] == 1)
                {
                    _stripes[taken].EnterReadLock();
                }
                else if (mode[taken] == 2)
                {
                    _stripes[taken].EnterWriteLock();
                }
            }
            WriteLocked(offset, data, start, end, headPartial, tailPartial);
        }
        finally
        {
            while (--taken >= 0)
            {
                if (mode[taken] == 1)
                {
                    _stripes[taken].ExitReadLock();
                }
                else if (mode[taken] == 2)
                {
                    _stripes[taken].ExitWriteLock();
                }
            }
        }
    }

    private void WriteLocked(long offset, ReadOnlySpan<byte> data, long start, long end, bool headPartial, bool tailPartial)
    {
        if (IsAligned(offset, data.Length, data))
        {
            _inner.Write(offset, data);
            return;
        }
        using var bounce = new AlignedBuffer(checked((int)(end - start)));
        var length = _inner.Length;
        var tailStart = end - Alignment;
        // Only the partial head and tail blocks need their old bytes.
        if (headPartial && start < length)
        {
            _inner.Read(start, bounce.Span[..Alignment]);
        }
        if (tailPartial && tailStart < length && !(headPartial && tailStart == start))
        {
            _inner.Read(tailStart, bounce.Span[^Alignment..]);
        }
        data.CopyTo(bounce.Span[(int)(offset - start)..]);
        // The file may end up padded to the next 4 KiB: harmless, qcow2 never reads meaning into the tail.
        _inner.Write(start, bounce.Span);
    }

    public override void Flush() => _inner.Flush();

    public override void SetLength(long length) => _inner.SetLength(length);

    public override void EnsureLength(long end) => _inner.EnsureLength(end);

    public override void Allocate(long offset, long length) => _inner.Allocate(offset, length);

    public override void Lock(bool writable) => _inner.Lock(writable);

    public override void Reclaim(long offset, long length) => _inner.Reclaim(offset, length);

    public override long AllocatedBytes => _inner.AllocatedBytes;

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _inner.Dispose();
            foreach (var stripe in _stripes)
            {
                stripe.Dispose();
            }
        }
    }

    /// <summary>Native memory aligned for O_DIRECT; freed at the end of its scope.</summary>
    private readonly struct AlignedBuffer : IDisposable
    {
        private readonly void* _ptr;
        private readonly int _length;

        public AlignedBuffer(int length)
        {
            _length = length;
            _ptr = NativeMemory.AlignedAlloc((nuint)length, Alignment);
            // Bytes past the end of the file are never read into the buffer: they must be zero, not heap garbage.
            NativeMemory.Clear(_ptr, (nuint)length);
        }

        public Span<byte> Span => new(_ptr, _length);

        public void Dispose() => NativeMemory.AlignedFree(_ptr);
    }
}
