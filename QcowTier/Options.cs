namespace QcowTier;

/// <summary>How the image's file is cached by the host.</summary>
public enum QcowCacheMode
{
    /// <summary>Through the page cache (QEMU's cache=writeback); durability at <see cref="QcowImage.Flush"/>.</summary>
    Writeback,

    /// <summary>Bypassing the page cache with O_DIRECT (QEMU's cache=none); durability still at <see cref="QcowImage.Flush"/>.</summary>
    None,
}

/// <summary>The qcow2 format version written by <see cref="QcowImage.Create(string, long, QcowCreateOptions?)"/>.</summary>
public enum QcowCompat
{
    /// <summary>Version 2 (QEMU's compat=0.10): no zero flag, 16-bit refcounts only.</summary>
    V2 = 2,

    /// <summary>Version 3 (QEMU's compat=1.1): zero clusters, feature bits, lazy refcounts.</summary>
    V3 = 3,
}

/// <summary>What <see cref="QcowImage.Create(string, long, QcowCreateOptions?)"/> allocates up front.</summary>
public enum QcowPreallocation
{
    /// <summary>Nothing: clusters are allocated on first write.</summary>
    Off,

    /// <summary>All L2 tables and data clusters are allocated; the data stays sparse and reads as zeroes.</summary>
    Metadata,
}

/// <summary>How compressed clusters are encoded (qcow2's compression_type).</summary>
public enum QcowCompressionType
{
    /// <summary>Raw deflate, readable by every qcow2 reader (compression_type=zlib).</summary>
    Zlib = 0,

    /// <summary>zstd frames (compression_type=zstd; version 3 only, incompatible feature bit 3): faster, QEMU 5.1 and later.</summary>
    Zstd = 1,
}

/// <summary>What <see cref="QcowImage.Check"/> may repair (qemu-img check -r).</summary>
public enum QcowRepairMode
{
    /// <summary>Only report.</summary>
    None,

    /// <summary>Free leaked clusters (-r leaks).</summary>
    Leaks,

    /// <summary>Fix leaks and refcount errors (-r all).</summary>
    All,
}

/// <summary>Options for opening an image.</summary>
public sealed class QcowOpenOptions
{
    /// <summary>Open without write access. Images marked corrupt can only be opened this way.</summary>
    public bool ReadOnly { get; init; }

    /// <summary>Page cache or O_DIRECT. Ignored for streams.</summary>
    public QcowCacheMode CacheMode { get; init; } = QcowCacheMode.Writeback;

    /// <summary>Bytes of L2 tables to keep in memory (QEMU's l2-cache-size); 0 picks QEMU's default.</summary>
    public long L2CacheSize { get; init; }

    /// <summary>Bytes of refcount blocks to keep in memory (QEMU's refcount-cache-size); 0 picks a default.</summary>
    public long RefcountCacheSize { get; init; }

    /// <summary>For stream and handle opens: leave the stream or handle open when the image is disposed.</summary>
    public bool LeaveOpen { get; init; }

    /// <summary>
    /// Skip QEMU's image locks (qemu-img -U, force-share). By default a path open takes QEMU-compatible
    /// locks, so an image a VM or qemu-img is writing is refused ("Failed to get shared "write" lock"),
    /// and a writer here keeps them away.
    /// </summary>
    public bool ForceShare { get; init; }

    /// <summary>
    /// For tiered images: the HDD data file to use instead of the one the image names (required when
    /// the image is opened from a stream or handle). It must still carry the image's UUID.
    /// </summary>
    public string? TierDataFile { get; init; }
}

/// <summary>Options for creating an image (qemu-img create -o).</summary>
public sealed class QcowCreateOptions
{
    /// <summary>Cluster size in bytes: a power of two from 512 to 2 MiB (cluster_size). Default 64 KiB.</summary>
    public int ClusterSize { get; init; } = 65536;

    /// <summary>Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64 (refcount_bits). Default 16; version 2 allows only 16.</summary>
    public int RefcountBits { get; init; } = 16;

    /// <summary>Format version (compat). Default version 3.</summary>
    public QcowCompat Compat { get; init; } = QcowCompat.V3;

    /// <summary>Delay refcount updates, marking the image dirty while open (lazy_refcounts; version 3 only).</summary>
    public bool LazyRefcounts { get; init; }

    /// <summary>What to allocate up front (preallocation).</summary>
    public QcowPreallocation Preallocation { get; init; } = QcowPreallocation.Off;

    /// <summary>Page cache or O_DIRECT for the created image.</summary>
    public QcowCacheMode CacheMode { get; init; } = QcowCacheMode.Writeback;

    /// <summary>How <see cref="QcowImage.WriteCompressed"/> compresses clusters (compression_type). Default zlib.</summary>
    public QcowCompressionType CompressionType { get; init; } = QcowCompressionType.Zlib;

    /// <summary>
    /// Extended L2 entries (extended_l2; version 3, clusters of at least 16 KiB): each cluster has 32
    /// subclusters allocated and zeroed on their own, so small writes to new clusters write less.
    /// </summary>
    public bool ExtendedL2 { get; init; }

    /// <summary>Make a tiered image, with its HDD data file and placement policy; null for a plain image.</summary>
    public QcowTierOptions? Tier { get; init; }
}
