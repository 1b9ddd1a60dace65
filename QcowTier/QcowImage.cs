using System.Buffers.Binary;
using Microsoft.Win32.SafeHandles;
using QcowTier.Engine;
using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier;

/// <summary>
/// A qcow2 image, read and written exactly as QEMU does.
/// </summary>
/// <remarks>
/// Thread safety: every member may be called from many threads at once, sync and async alike.
/// Reads and writes of disjoint ranges proceed in parallel; overlapping requests behave as on a
/// disk: a read racing a write of the same bytes may see old bytes, new bytes or a mix of the two
/// (the page cache does not make sectors atomic), but never bytes of another guest offset.
/// Durability: completed writes survive a power cut once <see cref="Flush"/> (or
/// <see cref="FlushAsync"/>) returns; a cut at any moment leaves the image consistent, with at
/// worst leaked clusters that <see cref="Check"/> repairs.
/// </remarks>
public sealed partial class QcowImage : IDisposable, IAsyncDisposable
{
    private readonly QcowCore _core;

    private QcowImage(QcowCore core) => _core = core;

    internal QcowCore Core => _core;

    /// <summary>Opens an existing image, recognised by its magic number (never by its file name).</summary>
    /// <param name="path">The image file.</param>
    /// <param name="options">How to open it; null for read-write through the page cache.</param>
    /// <returns>The open image.</returns>
    public static QcowImage Open(string path, QcowOpenOptions? options = null)
    {
        options ??= new QcowOpenOptions();
        ImageStorage storage = options.CacheMode == QcowCacheMode.None
            ? DirectFileStorage.Open(path, !options.ReadOnly)
            : FileStorage.Open(path, !options.ReadOnly);
        if (!options.ForceShare)
        {
            try
            {
                storage.Lock(!options.ReadOnly);
            }
            catch
            {
                storage.Dispose();
                throw;
            }
        }
        return OpenStorage(storage, options);
    }

    /// <summary>Opens an image from a file handle; the handle is disposed with the image unless <see cref="QcowOpenOptions.LeaveOpen"/>.</summary>
    /// <param name="handle">A handle opened for reading (and writing, unless read-only).</param>
    /// <param name="options">How to open it.</param>
    /// <returns>The open image.</returns>
    public static QcowImage Open(SafeFileHandle handle, QcowOpenOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(handle);
        options ??= new QcowOpenOptions();
        return OpenStorage(new FileStorage(handle, options.FileName, !options.ReadOnly, !options.LeaveOpen), options);
    }

    /// <summary>Opens an image held in a seekable stream. Requests are serialized on the stream.</summary>
    /// <param name="stream">A readable, seekable stream (writable unless read-only).</param>
    /// <param name="options">How to open it.</param>
    /// <returns>The open image.</returns>
    public static QcowImage Open(Stream stream, QcowOpenOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(stream);
        options ??= new QcowOpenOptions();
        return OpenStorage(new StreamStorage(stream, options.FileName ?? (stream as FileStream)?.Name, options.LeaveOpen), options);
    }

    /// <summary>Opens an image on any storage (tests use a fault-injecting one); the storage is disposed with the image.</summary>
    internal static QcowImage OpenOn(ImageStorage storage, QcowOpenOptions? options = null, Func<string, bool, bool, ImageStorage>? dataFileFactory = null)
        => OpenStorage(storage, options ?? new QcowOpenOptions(), dataFileFactory);

    /// <summary>Creates an image on any storage; the storage is disposed with the image. The factory opens (path, writable, create) a tier data file.</summary>
    internal static QcowImage CreateOn(ImageStorage storage, long virtualSize, QcowCreateOptions? options = null, Func<string, bool, bool, ImageStorage>? dataFileFactory = null)
        => new(QcowCreator.Create(storage, virtualSize, options ?? new QcowCreateOptions(), dataFileFactory));

    private static QcowImage OpenStorage(ImageStorage storage, QcowOpenOptions options, Func<string, bool, bool, ImageStorage>? dataFileFactory = null)
    {
        try
        {
            var core = QcowCore.Open(storage, options.ReadOnly, options.L2CacheSize, options.RefcountCacheSize,
                tierDataFile: options.TierDataFile, cacheMode: options.CacheMode, dataFileFactory: dataFileFactory,
                backing: BackingContextFor(options),
                externalDataFile: options.ExternalDataFile, allowExternalDataAnywhere: options.AllowExternalDataFileAnywhere);
            if (options.Snapshot is not null)
            {
                OpenSnapshotView(core, options);
            }
            return new QcowImage(core);
        }
        catch
        {
            storage.Dispose();
            throw;
        }
    }

    /// <summary>Creates a new image file (which must not exist) and opens it read-write.</summary>
    /// <param name="path">Where to create it.</param>
    /// <param name="virtualSize">The guest-visible size in bytes.</param>
    /// <param name="options">Format options; null for QEMU's defaults (v3, 64 KiB clusters, 16-bit refcounts).</param>
    /// <returns>The open image.</returns>
    public static QcowImage Create(string path, long virtualSize, QcowCreateOptions? options = null)
    {
        options ??= new QcowCreateOptions();
        QcowCreator.Validate(virtualSize, options);
        ImageStorage storage = FileStorage.Open(path, writable: true, create: true);
        if (options.CacheMode == QcowCacheMode.None)
        {
            storage.Dispose();
            storage = DirectFileStorage.Open(path, writable: true);
        }
        try
        {
            return new QcowImage(QcowCreator.Create(storage, virtualSize, options));
        }
        catch
        {
            storage.Dispose();
            try
            {
                File.Delete(path);
            }
            catch (IOException)
            {
                // Leave the half-made file; the original error matters more.
            }
            throw;
        }
    }

    /// <summary>Creates a new image in a stream (its content is replaced) and opens it read-write.</summary>
    /// <param name="stream">A readable, writable, seekable stream.</param>
    /// <param name="virtualSize">The guest-visible size in bytes.</param>
    /// <param name="options">Format options.</param>
    /// <param name="leaveOpen">Leave the stream open when the image is disposed.</param>
    /// <returns>The open image.</returns>
    public static QcowImage Create(Stream stream, long virtualSize, QcowCreateOptions? options = null, bool leaveOpen = false)
    {
        ArgumentNullException.ThrowIfNull(stream);
        options ??= new QcowCreateOptions();
        var storage = new StreamStorage(stream, (stream as FileStream)?.Name, leaveOpen);
        try
        {
            return new QcowImage(QcowCreator.Create(storage, virtualSize, options));
        }
        catch
        {
            storage.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The file sizes a new image with these options would take (qemu-img measure -O qcow2): fully
    /// allocated, and holding <paramref name="dataBytes"/> bytes of data clusters.
    /// </summary>
    /// <param name="virtualSize">The guest-visible size in bytes.</param>
    /// <param name="options">Cluster size, refcount width and preallocation (falloc and full count every cluster); null for the defaults.</param>
    /// <param name="dataBytes">Bytes of whole data clusters the image will hold (0 for an empty image).</param>
    /// <returns>The two sizes, equal to qemu-img's.</returns>
    public static QcowMeasurement Measure(long virtualSize, QcowCreateOptions? options = null, long dataBytes = 0)
        => QcowMeasure.Measure(virtualSize, options ?? new QcowCreateOptions(), dataBytes);

    /// <summary>The file sizes a copy of this image with other options would take (qemu-img measure -O qcow2 FILE).</summary>
    /// <param name="options">The target's options; null for the defaults.</param>
    /// <returns>The two sizes, equal to qemu-img's for a source with no file-level holes inside allocated clusters.</returns>
    public QcowMeasurement Measure(QcowCreateOptions? options = null)
    {
        options ??= new QcowCreateOptions();
        var runs = GetMap().Select(e => (e.Start, e.Length, e.Kind is QcowExtentKind.Data or QcowExtentKind.Compressed));
        return QcowMeasure.Measure(Size, options, QcowMeasure.CountData(runs, options.ClusterSize));
    }

    /// <summary>Whether the bytes start with the qcow2 magic number.</summary>
    /// <param name="header">The first bytes of a file (at least 4).</param>
    /// <returns>True for a qcow2 image.</returns>
    public static bool IsQcow2(ReadOnlySpan<byte> header)
        => header.Length >= 4 && BinaryPrimitives.ReadUInt32BigEndian(header) == QcowHeader.Magic;

    /// <summary>Whether the file starts with the qcow2 magic number.</summary>
    /// <param name="path">The file to probe.</param>
    /// <returns>True for a qcow2 image.</returns>
    public static bool IsQcow2(string path)
    {
        Span<byte> magic = stackalloc byte[4];
        using var h = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        return RandomAccess.Read(h, magic, 0) == 4 && IsQcow2(magic);
    }

    /// <summary>The image's file name, when it has one.</summary>
    public string? FileName => _core.Name;

    /// <summary>The guest-visible size in bytes.</summary>
    public long Size => _core.Size;

    /// <summary>Cluster size in bytes.</summary>
    public int ClusterSize => _core.ClusterSize;

    /// <summary>Format version, 2 or 3.</summary>
    public int Version => (int)_core.Header.Version;

    /// <summary>Refcount width in bits.</summary>
    public int RefcountBits => _core.Header.RefcountBits;

    /// <summary>Whether the image was opened read-only (or was switched to read-only after detecting corruption).</summary>
    public bool IsReadOnly => _core.ReadOnly;

    /// <summary>Reads guest bytes; unallocated and zero clusters read as zeroes.</summary>
    /// <param name="offset">Guest byte offset.</param>
    /// <param name="buffer">Where to put the bytes; its length is the request's length.</param>
    public void Read(long offset, Span<byte> buffer) => _core.Read(offset, buffer);

    /// <summary>Reads guest bytes asynchronously.</summary>
    /// <param name="offset">Guest byte offset.</param>
    /// <param name="buffer">Where to put the bytes.</param>
    /// <param name="cancellationToken">Cancels between clusters.</param>
    /// <returns>Completes when the bytes are in the buffer.</returns>
    public ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken = default)
        => _core.ReadAsync(offset, buffer, cancellationToken);

    /// <summary>Writes guest bytes, allocating clusters as needed.</summary>
    /// <param name="offset">Guest byte offset.</param>
    /// <param name="data">The bytes.</param>
    public void Write(long offset, ReadOnlySpan<byte> data) => _core.Write(offset, data);

    /// <summary>Writes guest bytes asynchronously.</summary>
    /// <param name="offset">Guest byte offset.</param>
    /// <param name="data">The bytes.</param>
    /// <param name="cancellationToken">Cancels between clusters.</param>
    /// <returns>Completes when the write is done (durable after the next flush).</returns>
    public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default)
        => _core.WriteAsync(offset, data, cancellationToken);

    /// <summary>
    /// Writes whole clusters compressed (qemu-io write -c): deflate or zstd, per the image's
    /// <see cref="QcowImageInfo.CompressionType"/>, packed back to back as QEMU packs them. A cluster
    /// that does not shrink is written uncompressed, as QEMU does. Clusters already allocated are replaced.
    /// </summary>
    /// <param name="offset">Guest byte offset, a multiple of <see cref="ClusterSize"/>.</param>
    /// <param name="data">Whole clusters; only the image's last cluster may be partial (it is zero-padded).</param>
    public void WriteCompressed(long offset, ReadOnlySpan<byte> data) => _core.WriteCompressed(offset, data);

    /// <summary>Asynchronous <see cref="WriteCompressed"/>.</summary>
    /// <param name="offset">Guest byte offset, a multiple of <see cref="ClusterSize"/>.</param>
    /// <param name="data">Whole clusters; only the image's last cluster may be partial.</param>
    /// <param name="cancellationToken">Cancels between clusters.</param>
    /// <returns>Completes when the write is done (durable after the next flush).</returns>
    public ValueTask WriteCompressedAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default)
        => _core.WriteCompressedAsync(offset, data, cancellationToken);

    /// <summary>Makes a range read as zeroes (qemu-io write -z); on version 3 whole clusters get the zero flag.</summary>
    /// <param name="offset">Guest byte offset.</param>
    /// <param name="length">Bytes.</param>
    /// <param name="mayUnmap">Whether whole clusters may be deallocated (qemu-io write -z -u).</param>
    public void WriteZeroes(long offset, long length, bool mayUnmap = false) => _core.WriteZeroes(offset, length, mayUnmap);

    /// <summary>Asynchronous <see cref="WriteZeroes"/>.</summary>
    /// <param name="offset">Guest byte offset.</param>
    /// <param name="length">Bytes.</param>
    /// <param name="mayUnmap">Whether whole clusters may be deallocated.</param>
    /// <param name="cancellationToken">Cancels before the work starts.</param>
    /// <returns>Completes when done.</returns>
    public ValueTask WriteZeroesAsync(long offset, long length, bool mayUnmap = false, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        return new ValueTask(Task.Run(() => _core.WriteZeroes(offset, length, mayUnmap), cancellationToken));
    }

    /// <summary>Deallocates the whole clusters in a range; they then read as zeroes. Partial clusters at the ends are untouched, as in QEMU.</summary>
    /// <param name="offset">Guest byte offset.</param>
    /// <param name="length">Bytes.</param>
    public void Discard(long offset, long length) => _core.Discard(offset, length);

    /// <summary>Asynchronous <see cref="Discard"/>.</summary>
    /// <param name="offset">Guest byte offset.</param>
    /// <param name="length">Bytes.</param>
    /// <param name="cancellationToken">Cancels before the work starts.</param>
    /// <returns>Completes when done.</returns>
    public ValueTask DiscardAsync(long offset, long length, CancellationToken cancellationToken = default)
    {
        cancellationToken.ThrowIfCancellationRequested();
        return new ValueTask(Task.Run(() => _core.Discard(offset, length), cancellationToken));
    }

    /// <summary>Makes every completed write and all metadata durable, in crash-safe order.</summary>
    public void Flush() => _core.Flush();

    /// <summary>Asynchronous <see cref="Flush"/>.</summary>
    /// <param name="cancellationToken">Cancels before the work starts.</param>
    /// <returns>Completes when everything is durable.</returns>
    public ValueTask FlushAsync(CancellationToken cancellationToken = default) => _core.FlushAsync(cancellationToken);

    /// <summary>
    /// Changes the virtual size (a multiple of 512). Shrinking deletes the data past the new end, frees its
    /// clusters and gives the file's free tail back, as qemu-img resize --shrink does.
    /// </summary>
    /// <param name="newSize">The new size in bytes.</param>
    public void Resize(long newSize) => _core.ResizeOverBacking(newSize);

    /// <summary>Grows the virtual disk, preallocating the new part as qemu-img resize --preallocation does.</summary>
    /// <param name="newSize">The new size in bytes; with a preallocation other than off, at least the current size.</param>
    /// <param name="preallocation">What to allocate for the new part.</param>
    public void Resize(long newSize, QcowPreallocation preallocation) => _core.ResizeOverBacking(newSize, preallocation);

    /// <summary>Changes format options of the image in place, as qemu-img amend does (and refuses what QEMU refuses).</summary>
    /// <param name="options">What to change.</param>
    /// <exception cref="ArgumentException">The combination is invalid (QEMU's wording).</exception>
    /// <exception cref="NotSupportedException">The image cannot take the change (QEMU's wording), e.g. a downgrade of an image with a data file.</exception>
    public void Amend(QcowAmendOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        _core.Amend(options.Compat, options.LazyRefcounts, options.RefcountBits);
    }

    /// <summary>Checks the image's metadata as qemu-img check does, optionally repairing it.</summary>
    /// <param name="repair">What to repair; anything but <see cref="QcowRepairMode.None"/> needs a writable image.</param>
    /// <returns>What was found and fixed.</returns>
    public QcowCheckResult Check(QcowRepairMode repair = QcowRepairMode.None) => _core.Check(repair);

    /// <summary>The allocation of a guest range, as qemu-img map reports it.</summary>
    /// <param name="offset">Guest byte offset.</param>
    /// <param name="length">Bytes; -1 for the rest of the disk.</param>
    /// <returns>Runs of one kind, in order, covering the range.</returns>
    public IReadOnlyList<QcowExtent> GetMap(long offset = 0, long length = -1)
    {
        if (length < 0)
        {
            length = Size - offset;
        }
        var runs = _core.Map(offset, length);
        var result = new List<QcowExtent>(runs.Count);
        var tiered = _core.IsTiered;
        foreach (var (start, len, kind, host, tier) in runs)
        {
            var k = kind switch
            {
                ClusterKind.Normal => QcowExtentKind.Data,
                ClusterKind.Compressed => QcowExtentKind.Compressed,
                ClusterKind.ZeroPlain or ClusterKind.ZeroAllocated => QcowExtentKind.Zero,
                _ => QcowExtentKind.Unallocated,
            };
            result.Add(new QcowExtent(start, len, k, host >= 0 ? host : null)
            {
                Tier = tiered && (host >= 0 || kind == ClusterKind.Compressed) ? (StorageTier)tier : null,
            });
        }
        return result;
    }

    /// <summary>What qemu-img info reports.</summary>
    /// <returns>The image's properties.</returns>
    public QcowImageInfo GetInfo()
    {
        var h = _core.Header;
        return new QcowImageInfo
        {
            FileName = _core.Name,
            VirtualSize = _core.Size,
            ActualSize = _core.AllocatedBytes,
            ClusterSize = _core.ClusterSize,
            Version = (int)h.Version,
            LazyRefcounts = (h.CompatibleFeatures & QcowHeader.CompatLazyRefcounts) != 0,
            RefcountBits = h.RefcountBits,
            Corrupt = (h.IncompatibleFeatures & QcowHeader.IncompatCorrupt) != 0,
            Dirty = (h.IncompatibleFeatures & QcowHeader.IncompatDirty) != 0,
            ExtendedL2 = (h.IncompatibleFeatures & QcowHeader.IncompatExtendedL2) != 0,
            CompressionType = h.CompressionType == 1 ? "zstd" : "zlib",
            SnapshotCount = (int)h.NbSnapshots,
            DataFile = _core.ExternalDataName,
            DataFileRaw = _core.ExternalDataRaw,
            BackingFile = BackingFile,
            FullBackingFileName = FullBackingFileName,
            BackingFormat = BackingFormat,
        };
    }

    /// <summary>The full path of the QEMU external data file (data_file) holding the guest data, or null.</summary>
    public string? ExternalDataFile => _core.ExternalDataPath;

    /// <summary>Whether the image uses the tiered layout (clusters on an SSD primary file and an HDD data file).</summary>
    public bool IsTiered => _core.IsTiered;

    /// <summary>The full path of the HDD data file of a tiered image, or null.</summary>
    public string? TierDataFile => _core.TierDataPath;

    /// <summary>Where new clusters go when no pin says otherwise (tiered images).</summary>
    public StorageTier DefaultTier => (RequireTier().Flags & Format.TierExtension.FlagDefaultHdd) != 0 ? StorageTier.Hdd : StorageTier.Ssd;

    /// <summary>The SSD budget in bytes (0: none) of a tiered image.</summary>
    public long SsdBudget => RequireTier().SsdBudget;

    private Format.TierExtension RequireTier()
        => _core.Tier ?? throw new InvalidOperationException($"{FileName ?? "image"} is not a tiered image");

    /// <summary>Turns this plain image into a tiered one in place; QEMU refuses it (by name) until <see cref="DetachTier"/>.</summary>
    /// <param name="options">The HDD data file (created here) and the placement policy.</param>
    public void AttachTier(QcowTierOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        _core.AttachTier(options.DataFile, (int)options.DefaultTier, options.SsdBudget);
    }

    /// <summary>Moves every cluster onto the primary file and removes the tiered layout, so stock QEMU opens the image again.</summary>
    /// <param name="deleteDataFile">Delete the (then unused) HDD data file.</param>
    public void DetachTier(bool deleteDataFile = true) => _core.DetachTier(deleteDataFile);

    /// <summary>Changes the placement policy for new clusters (persisted in the image).</summary>
    /// <param name="defaultTier">Where new clusters go when no pin says otherwise.</param>
    /// <param name="ssdBudget">Bytes of data the SSD tier may hold before new clusters go to HDD; 0 for no limit.</param>
    public void SetTierPolicy(StorageTier defaultTier, long ssdBudget) => _core.SetTierPolicy((int)defaultTier, ssdBudget);

    /// <summary>The pinned guest ranges, in order.</summary>
    /// <returns>The pins.</returns>
    public IReadOnlyList<TierPin> GetTierPins()
        => _core.Pins.Select(p => new TierPin(p.Start, p.Length, (StorageTier)p.Tier)).ToArray();

    /// <summary>Pins a guest range to a tier (persisted in the image). Existing clusters are not moved: use <see cref="MoveToTier"/>.</summary>
    /// <param name="offset">First guest byte.</param>
    /// <param name="length">Bytes.</param>
    /// <param name="tier">The tier.</param>
    public void PinTier(long offset, long length, StorageTier tier) => _core.SetPin(offset, length, (int)tier);

    /// <summary>Removes pins from a guest range.</summary>
    /// <param name="offset">First guest byte.</param>
    /// <param name="length">Bytes.</param>
    public void UnpinTier(long offset, long length) => _core.SetPin(offset, length, -1);

    /// <summary>Which tier holds each run of a guest range.</summary>
    /// <param name="offset">First guest byte.</param>
    /// <param name="length">Bytes; -1 for the rest of the disk.</param>
    /// <returns>Runs in order, merged where the tier is the same.</returns>
    public IReadOnlyList<TierExtent> GetPlacement(long offset = 0, long length = -1)
    {
        if (length < 0)
        {
            length = Size - offset;
        }
        var result = new List<TierExtent>();
        foreach (var (start, len, kind, _, tier) in _core.Map(offset, length))
        {
            StorageTier? t = kind is ClusterKind.Normal or ClusterKind.ZeroAllocated or ClusterKind.Compressed ? (StorageTier)tier : null;
            if (result.Count > 0 && result[^1].Tier == t && result[^1].Start + result[^1].Length == start)
            {
                result[^1] = result[^1] with { Length = result[^1].Length + len };
            }
            else
            {
                result.Add(new TierExtent(start, len, t));
            }
        }
        return result;
    }

    /// <summary>Bytes of allocated clusters on each tier (a plain image has everything on SSD).</summary>
    /// <returns>The usage.</returns>
    public TierUsage GetTierUsage()
    {
        var (ssd, hdd) = _core.TierBytes();
        return new TierUsage(ssd, hdd);
    }

    /// <summary>
    /// Moves the allocated clusters of a guest range to a tier, crash-safely and in batches (copy, flush,
    /// flip the L2 entries, flush, free). Concurrent reads and writes stay correct.
    /// </summary>
    /// <param name="offset">First guest byte (rounded down to a cluster).</param>
    /// <param name="length">Bytes (rounded up to whole clusters).</param>
    /// <param name="tier">The destination tier.</param>
    /// <param name="progress">Receives the bytes moved so far after each batch.</param>
    /// <param name="cancellationToken">Stops between batches; what was moved stays moved.</param>
    /// <returns>What was moved.</returns>
    public TierMoveResult MoveToTier(long offset, long length, StorageTier tier, IProgress<long>? progress = null, CancellationToken cancellationToken = default)
    {
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var (clusters, bytes) = _core.MoveToTier(offset, length, (int)tier, progress, cancellationToken);
        return new TierMoveResult(clusters, bytes, sw.Elapsed);
    }

    /// <summary>Copies the virtual disk into a new plain qcow2 image (or a raw file), sparse, for stock QEMU.</summary>
    /// <param name="path">The new file; it must not exist.</param>
    /// <param name="raw">Write a raw image instead of qcow2.</param>
    /// <param name="options">Format options of the new qcow2 image (a tier option here is ignored).</param>
    public void ExportTo(string path, bool raw = false, QcowCreateOptions? options = null)
    {
        var extents = GetChainMap(); // flattened: data of the backing chain is copied too
        var buffer = new byte[Math.Max(ClusterSize, 1 << 20)];
        var created = false;
        try
        {
            if (raw)
            {
                using var fs = new FileStream(path, FileMode.CreateNew, FileAccess.Write);
                created = true;
                fs.SetLength(Size);
                CopyData(extents, buffer, (off, span) => RandomAccess.Write(fs.SafeFileHandle, span, off));
                fs.Flush(flushToDisk: true);
                return;
            }
            var o = options ?? new QcowCreateOptions { ClusterSize = ClusterSize, RefcountBits = RefcountBits, Compat = (QcowCompat)Version };
            o = new QcowCreateOptions { ClusterSize = o.ClusterSize, RefcountBits = o.RefcountBits, Compat = o.Compat, LazyRefcounts = o.LazyRefcounts, CacheMode = o.CacheMode };
            using var target = Create(path, Size, o);
            created = true;
            CopyData(extents, buffer, (off, span) => target.Write(off, span));
            foreach (var e in extents)
            {
                if (e.Kind == QcowExtentKind.Zero && target.Version >= 3)
                {
                    target.WriteZeroes(e.Start, e.Length, mayUnmap: true);
                }
            }
            target.Flush();
        }
        catch when (created)
        {
            // Never leave a half-written export behind to be mistaken for a complete one
            // (the file is ours: it did not exist before; `using` has closed it by now).
            TryDelete(path);
            throw;
        }
    }

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (IOException)
        {
            // The original error is what the caller needs.
        }
        catch (UnauthorizedAccessException)
        {
        }
    }

    private delegate void SpanWriter(long offset, ReadOnlySpan<byte> data);

    private void CopyData(IReadOnlyList<QcowExtent> extents, byte[] buffer, SpanWriter write)
    {
        foreach (var e in extents)
        {
            if (e.Kind is not (QcowExtentKind.Data or QcowExtentKind.Compressed))
            {
                continue;
            }
            for (long done = 0; done < e.Length;)
            {
                var n = (int)Math.Min(buffer.Length, e.Length - done);
                Read(e.Start + done, buffer.AsSpan(0, n));
                write(e.Start + done, buffer.AsSpan(0, n));
                done += n;
            }
        }
    }

    /// <summary>
    /// The identity heat maps of this image are bound to: the tier UUID of a tiered image, else a UUID
    /// kept in a header extension of our own (added on a writable version 3 image the first time it is
    /// asked for; QEMU preserves it).
    /// </summary>
    public Guid HeatIdentity => _core.Identity();

    /// <summary>
    /// Records every guest read and write into a heat map (lock-free), or stops recording when null.
    /// The map must describe this image.
    /// </summary>
    public HeatMap? HeatRecorder
    {
        get => _core.Observer as HeatMap;
        set
        {
            if (value is not null && (value.ClusterSize != ClusterSize || value.ImageId != HeatIdentity))
            {
                throw new ArgumentException($"the heat map describes image {value.ImageId} with {value.ClusterSize}-byte clusters, not {FileName ?? "this image"} ({HeatIdentity}, {ClusterSize})", nameof(value));
            }
            _core.Observer = value;
        }
    }

    /// <summary>A seekable stream over the virtual disk. Disposing the stream leaves the image open.</summary>
    /// <returns>A new stream positioned at 0.</returns>
    public Stream AsStream() => new QcowStream(this);

    /// <summary>Flushes (when writable) and closes the image.</summary>
    public void Dispose() => _core.Dispose();

    /// <summary>Flushes (when writable) and closes the image.</summary>
    /// <returns>Completes when closed.</returns>
    public ValueTask DisposeAsync()
    {
        _core.Dispose();
        return ValueTask.CompletedTask;
    }
}
