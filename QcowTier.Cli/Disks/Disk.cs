namespace QcowTier.Cli.Disks;

/// <summary>An opened image of either format, as the verbs see it: guest bytes, allocation, flush.</summary>
internal abstract class Disk : IDisposable
{
    protected Disk(string fileName, CacheMode cache)
    {
        FileName = fileName;
        Cache = cache;
    }

    /// <summary>The name as given on the command line (qemu-img prints it unchanged).</summary>
    public string FileName { get; }

    public CacheMode Cache { get; }

    /// <summary>"qcow2" or "raw".</summary>
    public abstract string Format { get; }

    public abstract long Size { get; }

    public abstract void Read(long offset, Span<byte> buffer);

    public abstract ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken = default);

    public void Write(long offset, ReadOnlySpan<byte> data)
    {
        WriteCore(offset, data);
        if (Cache.WriteThrough)
        {
            Flush();
        }
    }

    public async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default)
    {
        await WriteCoreAsync(offset, data, cancellationToken).ConfigureAwait(false);
        if (Cache.WriteThrough)
        {
            await FlushAsync().ConfigureAwait(false);
        }
    }

    protected abstract void WriteCore(long offset, ReadOnlySpan<byte> data);

    protected abstract ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken);

    /// <summary>qemu-io write -z (and -u when <paramref name="mayUnmap"/>).</summary>
    public abstract void WriteZeroes(long offset, long length, bool mayUnmap);

    public abstract void Discard(long offset, long length);

    /// <summary>Makes completed writes durable, unless the cache mode is unsafe.</summary>
    public void Flush()
    {
        if (!Cache.NoFlush)
        {
            FlushCore();
        }
    }

    public ValueTask FlushAsync() => Cache.NoFlush ? ValueTask.CompletedTask : FlushCoreAsync();

    protected abstract void FlushCore();

    protected abstract ValueTask FlushCoreAsync();

    /// <summary>Changes the virtual size; shrinking only where the format allows it.</summary>
    public abstract void Resize(long newSize);

    /// <summary>Runs covering [offset, offset+length) in order, as bdrv_block_status reports them (want_zero).</summary>
    public abstract IEnumerable<BlockStatus> GetStatus(long offset, long length);

    /// <summary>Bytes the file occupies on the host (qemu-img's actual-size), or -1.</summary>
    public abstract long AllocatedBytes { get; }

    protected virtual void Dispose(bool disposing) { }

    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }
}
