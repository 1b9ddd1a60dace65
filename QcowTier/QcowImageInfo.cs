namespace QcowTier;

/// <summary>What qemu-img info reports about a qcow2 image.</summary>
public sealed class QcowImageInfo
{
    /// <summary>The image's file name, when it has one.</summary>
    public string? FileName { get; init; }

    /// <summary>The guest-visible size in bytes (virtual-size).</summary>
    public long VirtualSize { get; init; }

    /// <summary>Bytes the host file occupies on disk (actual-size), or -1 when unknown.</summary>
    public long ActualSize { get; init; }

    /// <summary>Cluster size in bytes.</summary>
    public int ClusterSize { get; init; }

    /// <summary>Format version: 2 or 3.</summary>
    public int Version { get; init; }

    /// <summary>"0.10" for version 2, "1.1" for version 3, as qemu-img prints it.</summary>
    public string Compat => Version >= 3 ? "1.1" : "0.10";

    /// <summary>Whether lazy refcounts are enabled.</summary>
    public bool LazyRefcounts { get; init; }

    /// <summary>Refcount width in bits.</summary>
    public int RefcountBits { get; init; }

    /// <summary>Whether the image is marked corrupt.</summary>
    public bool Corrupt { get; init; }

    /// <summary>Whether the dirty bit is set.</summary>
    public bool Dirty { get; init; }

    /// <summary>Whether extended L2 entries (subclusters) are used.</summary>
    public bool ExtendedL2 { get; init; }

    /// <summary>"zlib" or "zstd".</summary>
    public string CompressionType { get; init; } = "zlib";

    /// <summary>Number of internal snapshots.</summary>
    public int SnapshotCount { get; init; }

    /// <summary>The QEMU external data file's name as the image stores it (data-file), or null.</summary>
    public string? DataFile { get; init; }

    /// <summary>Whether the external data file is kept a valid raw image (data-file-raw).</summary>
    public bool DataFileRaw { get; init; }

    /// <summary>The backing file name as stored (backing-filename), or null.</summary>
    public string? BackingFile { get; init; }

    /// <summary>The path the backing file is opened by (full-backing-filename), or null.</summary>
    public string? FullBackingFileName { get; init; }

    /// <summary>The recorded backing file format (backing-filename-format), or null.</summary>
    public string? BackingFormat { get; init; }
}

/// <summary>What a run of guest bytes is backed by (qemu-img map).</summary>
public enum QcowExtentKind
{
    /// <summary>Not allocated in this image: reads as zeroes.</summary>
    Unallocated,

    /// <summary>Marked as zeroes (zero flag), with or without a preallocated host cluster.</summary>
    Zero,

    /// <summary>Data stored in the image.</summary>
    Data,

    /// <summary>Compressed data.</summary>
    Compressed,
}

/// <summary>A run of guest bytes of one kind, with contiguous host offsets when it has any.</summary>
/// <param name="Start">First guest byte.</param>
/// <param name="Length">Length in bytes.</param>
/// <param name="Kind">What backs the run.</param>
/// <param name="HostOffset">Offset of the first byte in the image file, or null.</param>
public readonly record struct QcowExtent(long Start, long Length, QcowExtentKind Kind, long? HostOffset)
{
    /// <summary>For tiered images: the tier holding an allocated run (data or preallocated zeroes); otherwise null.</summary>
    public StorageTier? Tier { get; init; }

    /// <summary>Which image of the backing chain the run comes from: 0 for this image, 1 for its backing file, … (qemu-img map's depth).</summary>
    public int Depth { get; init; }
}

/// <summary>The outcome of <see cref="QcowImage.Check"/>, with qemu-img check's fields.</summary>
public sealed class QcowCheckResult
{
    /// <summary>Corruptions found (after repair: still present).</summary>
    public int Corruptions { get; init; }

    /// <summary>Leaked clusters found (after repair: still present).</summary>
    public int Leaks { get; init; }

    /// <summary>Errors that prevented checking (I/O errors, unreadable tables).</summary>
    public int CheckErrors { get; init; }

    /// <summary>Corruptions repaired.</summary>
    public int CorruptionsFixed { get; init; }

    /// <summary>Leaks repaired.</summary>
    public int LeaksFixed { get; init; }

    /// <summary>Offset just past the last used cluster (image-end-offset).</summary>
    public long ImageEndOffset { get; init; }

    /// <summary>Guest clusters of the virtual disk (total-clusters).</summary>
    public long TotalClusters { get; init; }

    /// <summary>Guest clusters that are allocated (allocated-clusters).</summary>
    public long AllocatedClusters { get; init; }

    /// <summary>Allocated clusters not contiguous with their predecessor (fragmented-clusters).</summary>
    public long FragmentedClusters { get; init; }

    /// <summary>Compressed clusters (compressed-clusters).</summary>
    public long CompressedClusters { get; init; }

    /// <summary>One line per problem, worded as qemu-img check words it.</summary>
    public IReadOnlyList<string> Messages { get; init; } = [];

    /// <summary>No corruptions, leaks or check errors remain.</summary>
    public bool IsClean => Corruptions == 0 && Leaks == 0 && CheckErrors == 0;

    /// <summary>qemu-img check's exit code: 0 clean, 1 check failed, 2 corruptions, 3 leaks only.</summary>
    public int ExitCode => CheckErrors > 0 ? 1 : Corruptions > 0 ? 2 : Leaks > 0 ? 3 : 0;
}

/// <summary>What qemu-img measure reports for a qcow2 target.</summary>
/// <param name="RequiredBytes">The file size a new image needs for the data measured (its metadata counted as if fully allocated).</param>
/// <param name="FullyAllocatedBytes">The file size of the image with every cluster allocated.</param>
public readonly record struct QcowMeasurement(long RequiredBytes, long FullyAllocatedBytes);
