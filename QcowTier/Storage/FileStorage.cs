using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace QcowTier.Storage;

/// <summary>A file accessed with positional I/O (<see cref="RandomAccess"/>) on a <see cref="SafeFileHandle"/>.</summary>
internal sealed class FileStorage : ImageStorage
{
    private readonly SafeFileHandle _handle;
    private readonly bool _ownsHandle;
    private readonly bool _writable;
    private long _length;

    public FileStorage(SafeFileHandle handle, string? name, bool writable, bool ownsHandle)
    {
        _handle = handle;
        Name = name;
        _writable = writable;
        _ownsHandle = ownsHandle;
        _length = RandomAccess.GetLength(handle);
    }

    public static FileStorage Open(string path, bool writable, bool create = false)
    {
        var mode = create ? FileMode.CreateNew : FileMode.Open;
        var access = writable ? FileAccess.ReadWrite : FileAccess.Read;
        // FileShare.ReadWrite: qemu-img does not take exclusive access on a plain open either; the
        // advisory lock below is what keeps two writers apart.
        var handle = File.OpenHandle(path, mode, access, FileShare.ReadWrite, FileOptions.None);
        return new FileStorage(handle, path, writable, ownsHandle: true);
    }

    public SafeFileHandle Handle => _handle;

    public override string? Name { get; }

    public override long Length => Volatile.Read(ref _length);

    public override bool CanWrite => _writable;

    public override void Read(long offset, Span<byte> buffer)
    {
        var done = 0;
        while (done < buffer.Length)
        {
            var n = RandomAccess.Read(_handle, buffer[done..], offset + done);
            if (n == 0)
            {
                buffer[done..].Clear();
                return;
            }
            done += n;
        }
    }

    // Pooled builders: RandomAccess never completes synchronously here, so each await would allocate a box.
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public override async ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        var done = 0;
        while (done < buffer.Length)
        {
            var n = await RandomAccess.ReadAsync(_handle, buffer[done..], offset + done, cancellationToken).ConfigureAwait(false);
            if (n == 0)
            {
                buffer.Span[done..].Clear();
                return;
            }
            done += n;
        }
    }

    public override void Write(long offset, ReadOnlySpan<byte> data)
    {
        try
        {
            RandomAccess.Write(_handle, data, offset);
        }
        catch (ArgumentOutOfRangeException e) when (offset >= 0)
        {
            throw TooLarge(offset + data.Length, e);
        }
        UpdateLength(offset + data.Length);
    }

    /// <summary>.NET reports EFBIG as ArgumentOutOfRangeException; it is an I/O failure of this file ("File too large", says QEMU).</summary>
    private IOException TooLarge(long end, ArgumentOutOfRangeException e)
        => new($"{Name ?? "image"}: the file cannot grow to {end} bytes: {e.Message}", e);

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    public override async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        try
        {
            await RandomAccess.WriteAsync(_handle, data, offset, cancellationToken).ConfigureAwait(false);
        }
        catch (ArgumentOutOfRangeException e) when (offset >= 0)
        {
            throw TooLarge(offset + data.Length, e);
        }
        UpdateLength(offset + data.Length);
    }

    private void UpdateLength(long end)
    {
        var cur = Volatile.Read(ref _length);
        while (end > cur)
        {
            var seen = Interlocked.CompareExchange(ref _length, end, cur);
            if (seen == cur)
            {
                return;
            }
            cur = seen;
        }
    }

    public override void Flush()
    {
        if (_writable)
        {
            RandomAccess.FlushToDisk(_handle);
        }
    }

    public override void SetLength(long length)
    {
        try
        {
            RandomAccess.SetLength(_handle, length);
        }
        catch (ArgumentOutOfRangeException e) when (length >= 0)
        {
            throw TooLarge(length, e);
        }
        Volatile.Write(ref _length, length);
    }

    public override void Lock(bool writable) => ImageLock.Acquire(_handle, writable, Name);

    public override void Reclaim(long offset, long length)
    {
        if (OperatingSystem.IsLinux() && _writable)
        {
            NativeMethods.PunchHole(_handle, offset, length);
        }
    }

    public override void Allocate(long offset, long length)
    {
        if (OperatingSystem.IsLinux() && NativeMethods.Reserve(_handle, offset, length))
        {
            if (Length < offset + length)
            {
                UpdateLength(offset + length);
            }
            return;
        }
        base.Allocate(offset, length);
    }

    public override void EnsureLength(long end)
    {
        if (Length >= end)
        {
            return;
        }
        // fallocate with mode 0 only ever extends, so a concurrent writer past `end` is never cut off.
        if (OperatingSystem.IsLinux() && NativeMethods.Extend(_handle, end))
        {
            UpdateLength(end);
            return;
        }
        base.EnsureLength(end);
    }

    public override long AllocatedBytes => OperatingSystem.IsLinux() ? NativeMethods.AllocatedBytes(_handle) : -1;

    protected override void Dispose(bool disposing)
    {
        if (disposing && _ownsHandle)
        {
            _handle.Dispose();
        }
    }
}
