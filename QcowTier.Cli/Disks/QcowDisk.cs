using Microsoft.Win32.SafeHandles;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Disks;

/// <summary>A qcow2 image through the library, with QEMU's block-status rules layered on its map.</summary>
internal sealed partial class QcowDisk : Disk
{
    private readonly SafeFileHandle _probe;
    private bool? _metadataPreallocated;

    /// <param name="snapshot">An internal snapshot (id, else name) to show instead of the active disk; read-only.</param>
    public QcowDisk(string path, bool writable, CacheMode cache, bool noBacking = false, int depth = 0, string? snapshot = null) : base(path, cache)
    {
        _depth = depth;
        var options = new QcowOpenOptions
        {
            ReadOnly = !writable,
            CacheMode = cache.Direct ? QcowCacheMode.None : QcowCacheMode.Writeback,
            ForceShare = DiskOpener.ForceShare,
            BackingPolicy = noBacking ? QcowBackingPolicy.Ignore : QcowBackingPolicy.Follow,
            Snapshot = snapshot,
            // The operator named this image, so its data_file is followed wherever it lies, as qemu-img
            // does (the library's default refuses names leaving the image's folder, for untrusted images).
            AllowExternalDataFileAnywhere = true,
        };
        // cache=unsafe: the library flushes (fsyncs) on its own schedule and when closed; a stream
        // whose flush does not reach the disk is how it is told not to.
        Image = cache.NoFlush && writable && !cache.Direct
            ? QcowImage.Open(new UnsyncedFileStream(path), new QcowOpenOptions
            {
                ReadOnly = options.ReadOnly,
                CacheMode = options.CacheMode,
                ForceShare = options.ForceShare,
                BackingPolicy = options.BackingPolicy,
                AllowExternalDataFileAnywhere = options.AllowExternalDataFileAnywhere,
                FileName = path,
            })
            : QcowImage.Open(path, options);
        try
        {
            _probe = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        }
        catch
        {
            Image.Dispose();
            throw;
        }
    }

    public QcowImage Image { get; }

    public override string Format => "qcow2";

    public override long Size => Image.Size;

    public override long AllocatedBytes => NativeFile.AllocatedBytes(_probe);

    public override void Read(long offset, Span<byte> buffer) => Image.Read(offset, buffer);

    public override ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken = default)
        => Image.ReadAsync(offset, buffer, cancellationToken);

    protected override void WriteCore(long offset, ReadOnlySpan<byte> data) => Image.Write(offset, data);

    protected override ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
        => Image.WriteAsync(offset, data, cancellationToken);

    /// <summary>Whole clusters, compressed (qemu-io write -c, qemu-img convert -c).</summary>
    public void WriteCompressed(long offset, ReadOnlySpan<byte> data)
    {
        Image.WriteCompressed(offset, data);
        if (Cache.WriteThrough)
        {
            Flush();
        }
    }

    public override void WriteZeroes(long offset, long length, bool mayUnmap)
    {
        Image.WriteZeroes(offset, length, mayUnmap);
        if (Cache.WriteThrough)
        {
            Flush();
        }
    }

    public override void Discard(long offset, long length) => Image.Discard(offset, length);

    protected override void FlushCore() => Image.Flush();

    protected override ValueTask FlushCoreAsync() => Image.FlushAsync();

    public override void Resize(long newSize) => Image.Resize(newSize);

    public override IEnumerable<BlockStatus> GetStatus(long offset, long length) => ChainStatus(offset, length);

    private IEnumerable<BlockStatus> OwnStatus(long offset, long length)
    {
        if (length <= 0)
        {
            yield break;
        }
        // QEMU reports at most one L2 table's worth per query; compare -s sees where runs end (EOF).
        var tableSpan = (long)Image.ClusterSize * (Image.ClusterSize / 8);
        foreach (var whole in Image.GetMap(offset, length))
        {
            for (var start = whole.Start; start < whole.Start + whole.Length;)
            {
                var end = Math.Min(whole.Start + whole.Length, (start / tableSpan + 1) * tableSpan);
                var piece = whole with { Start = start, Length = end - start, HostOffset = whole.HostOffset + (start - whole.Start) };
                foreach (var s in Classify(piece))
                {
                    yield return s;
                }
                start = end;
            }
        }
    }

    private IEnumerable<BlockStatus> Classify(QcowExtent e)
    {
        switch (e.Kind)
        {
            case QcowExtentKind.Unallocated when Image.GetInfo().DataFileRaw:
                // QEMU: a raw external data file is the disk itself, so what qcow2 leaves unallocated is data there.
                yield return new BlockStatus(e.Start, e.Length, Present: true, Zero: false, Data: true, Offset: e.Start);
                break;
            case QcowExtentKind.Unallocated:
                // Extended L2: an unallocated subcluster of an allocated cluster still shows the cluster's offset.
                yield return new BlockStatus(e.Start, e.Length, Present: false, Zero: true, Data: false, Offset: e.HostOffset);
                break;
            case QcowExtentKind.Zero:
                yield return new BlockStatus(e.Start, e.Length, Present: true, Zero: true, Data: false, Offset: e.HostOffset, e.Tier);
                break;
            case QcowExtentKind.Compressed:
                yield return new BlockStatus(e.Start, e.Length, Present: true, Zero: false, Data: true, Offset: null, e.Tier);
                break;
            default:
                if (e.HostOffset is { } host && Image.ExternalDataFile is null && IsMetadataPreallocated())
                {
                    foreach (var s in RecurseIntoFile(e.Start, e.Length, host))
                    {
                        yield return s;
                    }
                }
                else
                {
                    yield return new BlockStatus(e.Start, e.Length, Present: true, Zero: false, Data: true, Offset: e.HostOffset, e.Tier);
                }
                break;
        }
    }

    /// <summary>
    /// QEMU asks the file about data clusters of metadata-preallocated images only (BDRV_BLOCK_RECURSE):
    /// clusters over holes of the file then count as zero, and runs split where the file's extents do.
    /// </summary>
    private IEnumerable<BlockStatus> RecurseIntoFile(long start, long length, long host)
    {
        var fileLength = RandomAccess.GetLength(_probe);
        for (long pos = 0; pos < length;)
        {
            var h = host + pos;
            var remaining = length - pos;
            if (h >= fileLength)
            {
                // Past the end of the file: reads as zeroes.
                yield return new BlockStatus(start + pos, remaining, true, true, true, h);
                yield break;
            }
            var bytes = Math.Min(remaining, fileLength - h);
            var found = NativeFile.FindAllocation(_probe, h, fileLength);
            if (found is null)
            {
                yield return new BlockStatus(start + pos, bytes, true, false, true, h);
                pos += bytes;
                continue;
            }
            var n = Math.Min(bytes, found.Value.End - h);
            if (!found.Value.Data && h + n == fileLength)
            {
                // A hole running to the end of the file: the whole run reads as zeroes.
                yield return new BlockStatus(start + pos, remaining, true, true, true, h);
                yield break;
            }
            yield return new BlockStatus(start + pos, n, true, !found.Value.Data, true, h);
            pos += n;
        }
    }

    private bool IsMetadataPreallocated()
        => _metadataPreallocated ??= MetadataPreallocationProbe.Detect(_probe, AllocatedBytes);

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            try
            {
                _backingDisk?.Dispose();
                Image.Dispose();
            }
            finally
            {
                _probe.Dispose();
            }
        }
    }
}
