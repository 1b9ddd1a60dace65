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
            PrepareTop(ctx);
        }
        if (ctx.Policy == QcowBackingPolicy.Ignore)
        {
            return;
        }
        _backing = BackingLayer.Open(Name, BackingName, BackingFormatName, ctx);
    }

    private void PrepareTop(BackingContext ctx)
    {
        BackingLayer.NoteTop(Name, ctx);
        if (ctx.Policy == QcowBackingPolicy.WithinRoot)
        {
            var root = ctx.Root ?? (Name is null ? null : Path.GetDirectoryName(Path.GetFullPath(Name)));
            ctx.RealRoot = root is null ? null : NativeMethods.RealPath(root);
        }
    }

    /// <summary>Opens <paramref name="name"/> as a new backing file of this (top) image, with the open options' policy, as a fresh chain.</summary>
    private BackingLayer? OpenNewBacking(string? name, string? format)
    {
        if (name is null)
        {
            return null;
        }
        var old = _backingContext ?? new BackingContext();
        var ctx = new BackingContext { Policy = old.Policy == QcowBackingPolicy.Ignore ? QcowBackingPolicy.Follow : old.Policy, Root = old.Root, ForceShare = old.ForceShare, CacheMode = old.CacheMode };
        PrepareTop(ctx);
        return BackingLayer.Open(Name, name, format, ctx);
    }

    /// <summary>Guest bytes of unallocated clusters: from the backing file, zeroes past its end.</summary>
    private void ReadBacking(long offset, Span<byte> buffer, bool forCopy = false)
    {
        if (_backing is null)
        {
            ThrowIfBackingLost();
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
            ThrowIfBackingLost();
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

    /// <summary>Set when a commit could not reopen the backing file: reads must not pretend it holds zeroes.</summary>
    private bool _backingLost;

    private void ThrowIfBackingLost()
    {
        if (_backingLost)
        {
            throw new QcowException($"{Name ?? "image"}: the backing file {BackingName} could not be reopened after a commit; reopen the image");
        }
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

    // ---------------------------------------------------------------- rebase and commit

    /// <summary>
    /// qemu-img rebase. Safe: wherever this image does not allocate a cluster and the old chain's content
    /// differs from the new backing file's, the old content is written into this image first (and flushed),
    /// so the guest sees the same disk before and after. Unsafe (-u): only the header changes.
    /// </summary>
    public void Rebase(string? newName, string? newFormat, bool unsafeRebase)
    {
        CheckWritable();
        if (newName is { Length: 0 })
        {
            newName = null;
        }
        if (newName is null)
        {
            newFormat = null;
        }
        else
        {
            BackingNames.ValidateName(newName, newFormat);
        }
        if (!unsafeRebase && HasBacking && _backing is null)
        {
            throw new InvalidOperationException($"{Name ?? "image"}: a safe rebase needs the current backing file, which was not opened (BackingPolicy.Ignore); use an unsafe rebase");
        }
        var keepIgnored = unsafeRebase && _backingContext?.Policy == QcowBackingPolicy.Ignore;
        var layer = keepIgnored ? null : OpenNewBacking(newName, newFormat);
        try
        {
            if (!unsafeRebase)
            {
                CopyDifferences(layer);
                Flush();
            }
            lock (_lock)
            {
                FlushLocked();
                RewriteBackingHeader(newName, newFormat);
                DisposeBacking();
                _backing = layer;
                layer = null;
            }
        }
        finally
        {
            layer?.Dispose();
        }
    }

    /// <summary>Copies into this image every cluster it does not allocate whose old content differs from the new backing file's.</summary>
    private void CopyDifferences(BackingLayer? next)
    {
        var oldBuf = new byte[_clusterSize];
        var newBuf = new byte[_clusterSize];
        foreach (var (start, length, kind, _, _) in Map(0, Size))
        {
            if (kind != ClusterKind.Unallocated)
            {
                continue;
            }
            for (var pos = start; pos < start + length;)
            {
                var n = (int)Math.Min(_clusterSize - (pos & (_clusterSize - 1)), start + length - pos);
                ReadBacking(pos, oldBuf.AsSpan(0, n));
                if (next is null)
                {
                    newBuf.AsSpan(0, n).Clear();
                }
                else
                {
                    next.Read(pos, newBuf.AsSpan(0, n));
                }
                if (!oldBuf.AsSpan(0, n).SequenceEqual(newBuf.AsSpan(0, n)))
                {
                    Write(pos, oldBuf.AsSpan(0, n));
                }
                pos += n;
            }
        }
    }

    /// <summary>
    /// Rewrites the extension area and the backing file name in one write of the first bytes of cluster 0
    /// (QEMU rewrites the whole header cluster the same way): the backing format extension first, the other
    /// extensions in their order, the end marker, then the name; the header's offset and size point at it.
    /// </summary>
    private void RewriteBackingHeader(string? name, string? format)
    {
        var list = Header.Extensions.Where(e => e.Type != HeaderExtension.BackingFormat).ToList();
        if (name is not null && format is not null)
        {
            list.Insert(0, new HeaderExtension(HeaderExtension.BackingFormat, System.Text.Encoding.UTF8.GetBytes(format), 0));
        }
        var start = Header.HeaderLength;
        var nameBytes = name is null ? [] : System.Text.Encoding.UTF8.GetBytes(name);
        var namePos = start + list.Sum(e => 8 + ((e.Data.Length + 7) & ~7)) + 8;
        var newEnd = namePos + nameBytes.Length;
        if (newEnd > _clusterSize)
        {
            throw new QcowException($"{Name ?? "image"}: the header extensions and the backing file name ({newEnd} bytes) do not fit in the first cluster");
        }
        var oldEnd = Math.Max(Header.Extensions.Count == 0 ? start + 8 : (int)Header.Extensions.Max(e => e.Offset + 8 + ((e.Data.Length + 7) & ~7)) + 8,
            (int)(Header.BackingFileOffset + Header.BackingFileSize));
        var buf = new byte[Math.Max(newEnd, oldEnd)];
        File.Read(0, buf.AsSpan(0, start));
        var pos = start;
        var updated = new List<HeaderExtension>();
        foreach (var e in list)
        {
            System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(buf.AsSpan(pos), e.Type);
            System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(buf.AsSpan(pos + 4), (uint)e.Data.Length);
            e.Data.CopyTo(buf.AsSpan(pos + 8));
            updated.Add(e with { Offset = pos });
            pos += 8 + ((e.Data.Length + 7) & ~7);
        }
        nameBytes.CopyTo(buf.AsSpan(namePos));
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(buf.AsSpan(QcowHeader.OffsetBackingFileOffset), name is null ? 0UL : (ulong)namePos);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(buf.AsSpan(QcowHeader.OffsetBackingFileSize), (uint)nameBytes.Length);
        File.Write(0, buf);
        File.Flush();
        Header.BackingFileOffset = name is null ? 0 : (ulong)namePos;
        Header.BackingFileSize = (uint)nameBytes.Length;
        Header.Extensions.Clear();
        Header.Extensions.AddRange(updated);
        BackingName = name;
        BackingFormatName = name is null ? null : format;
    }

    /// <summary>
    /// qemu-img commit: copies what this image allocates (data, and zero clusters as zeroes) into its backing
    /// file, growing it when smaller, flushes it, then (unless <paramref name="keepTop"/>) empties this image so
    /// every cluster reads from the backing file again. A crash before the backing file is flushed leaves this
    /// image intact; after, the content is the same either way.
    /// </summary>
    public void Commit(bool keepTop)
    {
        CheckWritable();
        if (_backing is null)
        {
            throw new InvalidOperationException(HasBacking
                ? $"{Name ?? "image"}: the backing file was not opened (BackingPolicy.Ignore)"
                : $"{Name ?? "image"}: Image does not have a backing file");
        }
        Flush();
        var path = _backing.Path;
        var raw = _backing.Format == "raw";
        var forceShare = _backingContext?.ForceShare == true;
        var runs = Map(0, Size).Where(r => r.Kind != ClusterKind.Unallocated).ToList();
        var buffer = new byte[Math.Max(_clusterSize, 1 << 20)];
        // Our read-only view of the backing file goes first: its shared lock would keep our own writer out
        // (as QEMU's image locks keep out a VM that uses the file). The runs copied are this image's own
        // clusters, which never read through it.
        lock (_lock)
        {
            DisposeBacking();
            _backingLost = true; // until reopened: a read through it must fail, not see zeroes
        }
        try
        {
            if (raw)
            {
                using var target = FileStorage.Open(path, writable: true);
                if (!forceShare)
                {
                    target.Lock(writable: true);
                }
                var rounded = (target.Length + QcowHeader.SectorSize - 1) & ~(long)(QcowHeader.SectorSize - 1);
                if (rounded < Size)
                {
                    target.SetLength(Size);
                }
                CopyRuns(runs, buffer, (o, d) => target.Write(o, d), (o, n) => WriteZeroesTo(target, o, n));
                target.Flush();
            }
            else
            {
                using var target = QcowImage.Open(path, new QcowOpenOptions { ForceShare = forceShare, BackingPolicy = QcowBackingPolicy.Follow });
                if (target.Size < Size)
                {
                    target.Resize(Size);
                }
                CopyRuns(runs, buffer, (o, d) => target.Write(o, d), (o, n) => target.WriteZeroes(o, n));
                target.Flush();
            }
        }
        finally
        {
            // Open afresh: the old view's caches would be stale.
            lock (_lock)
            {
                _backing = OpenNewBacking(BackingName, BackingFormatName);
                _backingLost = false;
            }
        }
        if (!keepTop)
        {
            MakeEmpty();
        }
    }

    private delegate void RunWriter(long offset, ReadOnlySpan<byte> data);

    private void CopyRuns(List<(long Start, long Length, ClusterKind Kind, long Host, int Tier)> runs, byte[] buffer, RunWriter write, Action<long, long> zero)
    {
        foreach (var (start, length, kind, _, _) in runs)
        {
            if (kind is ClusterKind.ZeroPlain or ClusterKind.ZeroAllocated)
            {
                zero(start, length);
                continue;
            }
            for (long done = 0; done < length;)
            {
                var n = (int)Math.Min(buffer.Length, length - done);
                Read(start + done, buffer.AsSpan(0, n));
                write(start + done, buffer.AsSpan(0, n));
                done += n;
            }
        }
    }

    private void WriteZeroesTo(ImageStorage target, long offset, long length)
    {
        while (length > 0)
        {
            var n = (int)Math.Min(length, _clusterSize);
            target.Write(offset, _zeroCluster.AsSpan(0, n));
            offset += n;
            length -= n;
        }
    }

    /// <summary>QEMU's make_empty after a commit: every entry back to unallocated (reads fall through again), clusters freed.</summary>
    private void MakeEmpty()
    {
        UpdateClusters(0, RoundUp(Size), e =>
        {
            switch (Kind(e))
            {
                case ClusterKind.Normal:
                case ClusterKind.ZeroAllocated:
                case ClusterKind.Compressed:
                    FreeCluster(e);
                    return 0;
                default:
                    return 0;
            }
        });
        Flush();
    }

    /// <summary>
    /// Growing an image whose backing file is longer than the old size: the new area would show the backing
    /// file's bytes, so it is zeroed (zero clusters on version 3, written zeroes on version 2), as QEMU's truncate does.
    /// </summary>
    public void ResizeOverBacking(long newSize, QcowPreallocation preallocation = QcowPreallocation.Off)
    {
        var old = Size;
        Resize(newSize, preallocation);
        if (newSize > old && _backing is { } b && b.Size > old)
        {
            WriteZeroes(old, newSize - old, mayUnmap: false);
        }
    }
}
