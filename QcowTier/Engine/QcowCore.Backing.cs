using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Engine;

/// <summary>
/// Backing files: the chain under this image, reads that fall through it, copy-on-write from it, and the
/// header's backing file name and format. Clusters the image does not allocate read from the backing
/// file (zeroes past its end); zero clusters read as zeroes and never fall through.
/// </summary>
internal sealed partial class QcowCore
{
    private BackingLayer? _backing;

    /// <summary>The backing file name as stored in the header, or null.</summary>
    public string? BackingName { get; private set; }

    /// <summary>The backing format extension's value, or null.</summary>
    public string? BackingFormatName { get; private set; }

    /// <summary>The opened backing file, or null (none, or not opened under <see cref="QcowBackingPolicy.Ignore"/>).</summary>
    public BackingLayer? Backing => _backing;

    /// <summary>The image names a backing file: unallocated clusters are not zeroes, so zeroing must use the zero flag.</summary>
    private bool HasBacking => BackingName is not null;

    private BackingContext? _backingContext;

    private void OpenBacking(BackingContext? ctx)
    {
        (BackingName, BackingFormatName) = BackingLayer.ReadNames(File, Header);
        ctx ??= new BackingContext();
        _backingContext = ctx;
        if (BackingName is null)
        {
            return;
        }
        if (IsTiered)
        {
            ThrowHelper.Unsupported(Name, QcowHeader.OffsetBackingFileOffset, "backing_file_offset", "tiered images with a backing file are not supported (flatten the image first)");
        }
        if (ctx.Depth == 0)
        {
            BackingLayer.NoteTop(Name, ctx);
            if (ctx.Policy == QcowBackingPolicy.WithinRoot)
            {
                var root = ctx.Root ?? (Name is null ? null : Path.GetDirectoryName(Path.GetFullPath(Name)));
                ctx.RealRoot = root is null ? null : NativeMethods.RealPath(root);
            }
        }
        if (ctx.Policy == QcowBackingPolicy.Ignore)
        {
            return;
        }
        _backing = BackingLayer.Open(Name, BackingName, BackingFormatName, ctx);
    }

    /// <summary>Guest bytes of unallocated clusters: from the backing file, zeroes past its end.</summary>
    private void ReadBacking(long offset, Span<byte> buffer, bool forCopy = false)
    {
        if (_backing is null)
        {
            if (HasBacking && forCopy)
            {
                // Writing would bake zeroes over what the backing file holds.
                throw new InvalidOperationException($"{Name ?? "image"}: the backing file was not opened (BackingPolicy.Ignore), so this write cannot copy its data");
            }
            buffer.Clear();
            return;
        }
        _backing.Read(offset, buffer);
    }

    private ValueTask ReadBackingAsync(long offset, Memory<byte> buffer, CancellationToken ct)
    {
        if (_backing is null)
        {
            buffer.Span.Clear();
            return ValueTask.CompletedTask;
        }
        return _backing.ReadAsync(offset, buffer, ct);
    }

    /// <summary>
    /// Copy-on-write of a new allocation over unallocated clusters: the parts of its first and last clusters
    /// the guest does not write get the backing file's bytes. Written before the L2 entry is installed, and
    /// made durable by the flush that precedes any L2 write, so the entry never publishes a half-copied cluster.
    /// </summary>
    private void FillFromBacking(in WritePlan plan, ReadOnlySpan<byte> data)
    {
        var file = DataFile(plan.Tier);
        var guest = plan.GuestCluster << _clusterBits;
        var total = (long)plan.Clusters << _clusterBits;
        if (plan.Head > 0)
        {
            var head = new byte[plan.Head];
            ReadBacking(guest, head, forCopy: true);
            file.Write(plan.Host, head);
        }
        var tailStart = plan.Head + data.Length;
        if (tailStart < total)
        {
            var tail = new byte[total - tailStart];
            ReadBacking(guest + tailStart, tail, forCopy: true);
            file.Write(plan.Host + tailStart, tail);
        }
        file.Write(plan.Host + plan.Head, data);
    }

    private void DisposeBacking()
    {
        _backing?.Dispose();
        _backing = null;
    }

    /// <summary>
    /// Discard with a backing file, as QEMU: on version 3 every cluster (even an unallocated one) becomes a zero
    /// cluster, so the discarded range reads as zeroes and never shows the backing data; version 2 has no zero
    /// flag, so QEMU leaves the clusters alone, and so do we.
    /// </summary>
    private void DiscardOverBacking(long start, long end)
    {
        if (Header.Version < 3)
        {
            return;
        }
        UpdateClusters(start, Math.Min(end, RoundUp(Size)), e =>
        {
            var kind = Kind(e);
            switch (kind)
            {
                case ClusterKind.Normal:
                case ClusterKind.ZeroAllocated:
                case ClusterKind.Compressed:
                    FreeCluster(e);
                    return ClusterLayout.Zero;
                default:
                    return ClusterLayout.Zero;
            }
        }, allocateTables: true);
    }

    /// <summary>
    /// <see cref="Map"/> through the chain: unallocated runs are resolved in the backing file (beyond its size
    /// they stay unallocated at this depth, as QEMU reports them).
    /// </summary>
    public List<(long Start, long Length, ClusterKind Kind, long Host, int Tier, int Depth)> MapChain(long offset, long length, int depth)
    {
        var result = new List<(long, long, ClusterKind, long, int, int)>();
        foreach (var (s, l, k, h, t) in Map(offset, length))
        {
            if (k != ClusterKind.Unallocated || _backing is null)
            {
                result.Add((s, l, k, h, t, depth));
                continue;
            }
            var inside = Math.Clamp(_backing.Size - s, 0, l);
            if (inside > 0)
            {
                if (_backing.Qcow is { } q)
                {
                    result.AddRange(q.MapChain(s, inside, depth + 1));
                }
                else
                {
                    result.Add((s, inside, ClusterKind.Normal, s, 0, depth + 1));
                }
            }
            if (inside < l)
            {
                result.Add((s + inside, l - inside, ClusterKind.Unallocated, -1, 0, depth));
            }
        }
        return result;
    }
}
