using QcowTier.Engine;

namespace QcowTier;

/// <summary>Backing files: the chain under the image, a map through it, rebase and commit.</summary>
public sealed partial class QcowImage
{
    /// <summary>The deepest backing chain opened: images below this many layers are refused (<see cref="QcowBackingError.TooDeep"/>).</summary>
    public const int MaxBackingDepth = 256;

    private static BackingContext BackingContextFor(QcowOpenOptions options) => new()
    {
        Policy = options.BackingPolicy,
        Root = options.BackingRoot,
        ForceShare = options.ForceShare,
        CacheMode = options.CacheMode,
    };

    /// <summary>The backing file name as stored in the image (relative names are relative to the image's folder), or null.</summary>
    public string? BackingFile => _core.BackingName;

    /// <summary>The backing file format the image records ("qcow2", "raw"), or null when it records none.</summary>
    public string? BackingFormat => _core.BackingFormatName;

    /// <summary>The path the backing file is opened by (QEMU's full backing filename), or null.</summary>
    public string? FullBackingFileName => _core.BackingName is { } name ? BackingLayer.Combine(FileName, name) : null;

    /// <summary>The images under this one, nearest first; empty without a backing file (or when it was not opened).</summary>
    /// <returns>One entry per layer, with its depth.</returns>
    public IReadOnlyList<QcowBackingLayer> GetBackingChain()
    {
        var result = new List<QcowBackingLayer>();
        var layer = _core.Backing;
        while (layer is not null)
        {
            result.Add(new QcowBackingLayer(result.Count + 1, layer.Path, layer.Format, layer.Size));
            layer = layer.Qcow?.Backing;
        }
        return result;
    }

    /// <summary>
    /// The allocation of a guest range through the whole backing chain (qemu-img map): runs this image does not
    /// allocate are resolved in its backing file, and so on down; <see cref="QcowExtent.Depth"/> says which layer
    /// a run comes from and <see cref="QcowExtent.HostOffset"/> is an offset in that layer's file.
    /// <see cref="QcowExtentKind.Unallocated"/> runs are allocated nowhere and read as zeroes. A raw backing file is
    /// reported as data throughout, at host offset = guest offset (qcowtier map asks the file system for its holes).
    /// </summary>
    /// <param name="offset">Guest byte offset.</param>
    /// <param name="length">Bytes; -1 for the rest of the disk.</param>
    /// <returns>Runs in order covering the range.</returns>
    public IReadOnlyList<QcowExtent> GetChainMap(long offset = 0, long length = -1)
    {
        if (length < 0)
        {
            length = Size - offset;
        }
        var result = new List<QcowExtent>();
        foreach (var (start, len, kind, host, tier, depth) in _core.MapChain(offset, length, 0))
        {
            var k = kind switch
            {
                ClusterKind.Normal => QcowExtentKind.Data,
                ClusterKind.Compressed => QcowExtentKind.Compressed,
                ClusterKind.ZeroPlain or ClusterKind.ZeroAllocated => QcowExtentKind.Zero,
                _ => QcowExtentKind.Unallocated,
            };
            var e = new QcowExtent(start, len, k, host >= 0 ? host : null)
            {
                Depth = depth,
                Tier = depth == 0 && _core.IsTiered && (host >= 0 || kind == ClusterKind.Compressed) ? (StorageTier)tier : null,
            };
            if (result.Count > 0 && result[^1] is var p && p.Kind == e.Kind && p.Depth == e.Depth && p.Tier == e.Tier && p.Start + p.Length == e.Start
                && (p.HostOffset is null && e.HostOffset is null || p.HostOffset + p.Length == e.HostOffset))
            {
                result[^1] = p with { Length = p.Length + e.Length };
                continue;
            }
            result.Add(e);
        }
        return result;
    }

    /// <summary>
    /// Changes the backing file (qemu-img rebase). A safe rebase first copies into this image every cluster it
    /// does not allocate whose content would change, so the guest sees the same disk; an unsafe one
    /// (<paramref name="unsafeRebase"/>, -u) only rewrites the name, for when the new file has the same content.
    /// </summary>
    /// <param name="backingFile">The new backing file name as it is to be stored (relative to this image's folder); null or empty to remove the backing file (a safe rebase then flattens the chain into this image).</param>
    /// <param name="backingFormat">"qcow2" or "raw", stored in the header; null to store none (readers probe).</param>
    /// <param name="unsafeRebase">Change only the header.</param>
    /// <remarks>No other writes to this image may run meanwhile. With <see cref="QcowBackingPolicy.Ignore"/> only an unsafe rebase is possible, and the new file is not opened.</remarks>
    public void Rebase(string? backingFile, string? backingFormat = null, bool unsafeRebase = false)
        => _core.Rebase(backingFile, backingFormat, unsafeRebase);

    /// <summary>
    /// Writes what this image allocates into its backing file (qemu-img commit), growing the backing file when it
    /// is smaller, then empties this image so it reads everything from the backing file again.
    /// No other writes to this image may run meanwhile.
    /// </summary>
    /// <param name="keepTop">Leave this image's clusters in place (qemu-img commit -d).</param>
    public void Commit(bool keepTop = false) => _core.Commit(keepTop);
}
