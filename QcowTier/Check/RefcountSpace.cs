using QcowTier.Storage;

namespace QcowTier.Check;

/// <summary>
/// The clusters of one file and the refcount structure that counts them: the primary file's own,
/// or, in a tiered image, the HDD data file's (whose refcount table and blocks live in the primary
/// file, docs/FORMAT.md §2.5).
/// </summary>
internal sealed class RefcountSpace
{
    public RefcountSpace(string label, ImageStorage countedFile, ReferenceCounts refs, OnDiskRefcounts onDisk)
    {
        Label = label;
        CountedFile = countedFile;
        Refs = refs;
        OnDisk = onDisk;
    }

    /// <summary>Prefix for messages: empty for the primary file (QEMU's wording), "HDD " for the tier data file.</summary>
    public string Label { get; }

    /// <summary>The file whose clusters are counted.</summary>
    public ImageStorage CountedFile { get; }

    /// <summary>References the metadata makes to the counted file's clusters.</summary>
    public ReferenceCounts Refs { get; }

    /// <summary>The refcounts recorded for them.</summary>
    public OnDiskRefcounts OnDisk { get; }

    /// <summary>Only a new refcount structure can make the recorded refcounts right.</summary>
    public bool NeedsRebuild { get; set; }

    /// <summary>The last cluster with a reference or a refcount (for image-end-offset).</summary>
    public long Highest { get; set; }
}
