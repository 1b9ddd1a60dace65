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

    /// <summary>As <see cref="Metadata"/>, and the data clusters are reserved in the file system (fallocate).</summary>
    Falloc,

    /// <summary>As <see cref="Metadata"/>, and zeroes are written over every data cluster.</summary>
    Full,
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

    /// <summary>Show the disk as an internal snapshot (its id, or else its name) holds it; needs <see cref="ReadOnly"/>.</summary>
    public string? Snapshot { get; init; }

    /// <summary>
    /// For stream and handle opens: the image's path, used in messages and to resolve a relative backing file
    /// name (against its folder). Path opens use the path given.
    /// </summary>
    public string? FileName { get; init; }

    /// <summary>Which backing files the image may make us open; <see cref="QcowBackingPolicy.Follow"/> (QEMU's behaviour) by default.</summary>
    public QcowBackingPolicy BackingPolicy { get; init; }

    /// <summary>With <see cref="QcowBackingPolicy.WithinRoot"/>: the folder every backing file must lie in; null for the image's own folder.</summary>
    public string? BackingRoot { get; init; }

    /// <summary>
    /// For images with a QEMU external data file (data_file): the file to use instead of the one the image
    /// names (QEMU's data-file open option; required for stream and handle opens).
    /// </summary>
    public string? ExternalDataFile { get; init; }

    /// <summary>
    /// Follow an external data file name that is absolute or leaves the image's folder. Off by default:
    /// a hostile image must not make us open arbitrary files.
    /// </summary>
    public bool AllowExternalDataFileAnywhere { get; init; }
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

    /// <summary>
    /// The backing file (qemu-img create -b), stored as given: a relative name is relative to the new image's
    /// folder. It must exist; clusters the new image does not allocate read from it. Null for none.
    /// </summary>
    public string? BackingFile { get; init; }

    /// <summary>The backing file's format, "qcow2" or "raw" (-F), stored in the image; null to detect it from the file's magic.</summary>
    public string? BackingFormat { get; init; }

    /// <summary>
    /// How the backing file is opened by the creation and by the returned image: <see cref="QcowBackingPolicy.Ignore"/>
    /// creates without opening or checking it (qemu-img create -u); the returned image then refuses copy-on-write.
    /// </summary>
    public QcowBackingPolicy BackingPolicy { get; init; }

    /// <summary>
    /// QEMU's external data file (data_file; version 3, not with <see cref="Tier"/>): guest data goes to this
    /// file at the guest offsets, metadata stays in the image. A relative name is relative to the image's
    /// folder; the file is created (replaced) with the image.
    /// </summary>
    public string? DataFile { get; init; }

    /// <summary>Keep <see cref="DataFile"/> a valid raw image of the virtual disk (data_file_raw).</summary>
    public bool DataFileRaw { get; init; }
}

/// <summary>What <see cref="QcowImage.Amend"/> changes (qemu-img amend -o); null leaves a setting as it is.</summary>
public sealed class QcowAmendOptions
{
    /// <summary>
    /// The format version (compat). A downgrade to version 2 needs 16-bit refcounts and no incompatible
    /// features; zero clusters are expanded (the content never changes).
    /// </summary>
    public QcowCompat? Compat { get; init; }

    /// <summary>Lazy refcounts on (version 3 only) or off (the refcounts are made right first).</summary>
    public bool? LazyRefcounts { get; init; }

    /// <summary>A new refcount width (1 to 64 bits, a power of two; version 3 for anything but 16): the refcount structures are rewritten crash-safely.</summary>
    public int? RefcountBits { get; init; }
}
