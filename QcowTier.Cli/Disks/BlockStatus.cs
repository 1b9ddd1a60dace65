namespace QcowTier.Cli.Disks;

/// <summary>One run of bdrv_block_status: what qemu-img map prints for it, and what convert and compare may skip.</summary>
/// <param name="Start">First guest byte.</param>
/// <param name="Length">Bytes.</param>
/// <param name="Present">Allocated in this image (BDRV_BLOCK_ALLOCATED).</param>
/// <param name="Zero">Known to read as zeroes (BDRV_BLOCK_ZERO).</param>
/// <param name="Data">Backed by data in the file (BDRV_BLOCK_DATA).</param>
/// <param name="Offset">Where the run's first byte lives in the file, when it has a place.</param>
/// <param name="Tier">For tiered images, the tier holding the run (its offset is in that tier's file).</param>
internal readonly record struct BlockStatus(long Start, long Length, bool Present, bool Zero, bool Data, long? Offset, StorageTier? Tier = null)
{
    public long End => Start + Length;

    /// <summary>Which image of the backing chain the run comes from (qemu-img map's depth): 0 for the image itself.</summary>
    public int Depth { get; init; }

    /// <summary>The file <see cref="Offset"/> is in, for runs of a backing file (null: the image itself).</summary>
    public string? File { get; init; }

    /// <summary>qemu-img's entry_mergeable: same flags, depth and file and, when placed, contiguous in the file.</summary>
    public bool CanMerge(in BlockStatus next)
        => Length > 0 && Zero == next.Zero && Data == next.Data && Present == next.Present && Depth == next.Depth
           && Offset.HasValue == next.Offset.HasValue && Tier == next.Tier && File == next.File
           && (!Offset.HasValue || Offset.Value + Length == next.Offset!.Value);

    public BlockStatus Extend(long bytes) => this with { Length = Length + bytes };
}
