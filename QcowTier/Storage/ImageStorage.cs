namespace QcowTier.Storage;

/// <summary>
/// Positional byte storage under an image: no shared position, so any number of callers may
/// read and write at once. Implementations: a file handle (page cache or O_DIRECT), a stream
/// (serialized), and in tests a fault-injecting wrapper.
/// </summary>
internal abstract class ImageStorage : IDisposable
{
    private readonly object _extendGate = new();

    /// <summary>The file's name for messages, or null.</summary>
    public abstract string? Name { get; }

    /// <summary>Whether buffers, offsets and lengths must be aligned (O_DIRECT).</summary>
    public virtual int RequiredAlignment => 1;

    public abstract long Length { get; }

    public abstract bool CanWrite { get; }

    /// <summary>Reads exactly buffer.Length bytes; bytes past the end of the storage read as zero.</summary>
    public abstract void Read(long offset, Span<byte> buffer);

    public abstract void Write(long offset, ReadOnlySpan<byte> data);

    public virtual ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        cancellationToken.ThrowIfCancellationRequested();
        Read(offset, buffer.Span);
        return ValueTask.CompletedTask;
    }

    public virtual ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        cancellationToken.ThrowIfCancellationRequested();
        Write(offset, data.Span);
        return ValueTask.CompletedTask;
    }

    /// <summary>Makes every completed write durable (fdatasync).</summary>
    public abstract void Flush();

    public abstract void SetLength(long length);

    /// <summary>Grows the storage to at least <paramref name="end"/> bytes; never shrinks it, even racing with writers.</summary>
    public virtual void EnsureLength(long end)
    {
        lock (_extendGate)
        {
            if (Length < end)
            {
                SetLength(end);
            }
        }
    }

    /// <summary>
    /// Reserves [offset, offset+length) in the host file system (preallocation=falloc), growing the file
    /// when needed; bytes already there are untouched. Where the host cannot reserve, zeroes are written
    /// over the part past the end of the file (what lies before it is kept).
    /// </summary>
    public virtual void Allocate(long offset, long length)
    {
        var zeroes = new byte[(int)Math.Min(length, 1 << 20)];
        var start = Math.Max(offset, Length);
        for (var pos = start; pos < offset + length; pos += zeroes.Length)
        {
            Write(pos, zeroes.AsSpan(0, (int)Math.Min(zeroes.Length, offset + length - pos)));
        }
    }

    /// <summary>Returns freed bytes to the host file system where it can (a hole); elsewhere does nothing.</summary>
    public virtual void Reclaim(long offset, long length)
    {
    }

    /// <summary>Takes QEMU-compatible image locks (file storages only).</summary>
    public virtual void Lock(bool writable)
    {
    }

    /// <summary>Bytes actually allocated on the host, or -1 when unknown.</summary>
    public virtual long AllocatedBytes => -1;

    protected virtual void Dispose(bool disposing) { }

    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }
}
