using System.Buffers;
using System.Runtime.CompilerServices;
using QcowTier.Compression;
using QcowTier.Format;

namespace QcowTier.Engine;

/// <summary>
/// Compressed clusters (qcow2.txt, "Compressed Clusters Descriptor"), as QEMU reads and writes them:
/// <list type="bullet">
/// <item>Reading decompresses the whole cluster (deflate or zstd, per the header's compression_type)
/// from at most two clusters of input; every descriptor is bounded and damaged data is a typed error.</item>
/// <item>Writing packs compressed clusters back to back (QEMU's qcow2_alloc_bytes): each one adds a
/// reference to every host cluster its bytes touch, so a host cluster holding several of them has a
/// refcount of several, and a compressed cluster may run on into the next contiguous host cluster.</item>
/// <item>A partial write to a compressed cluster decompresses it, merges, allocates a normal cluster
/// and drops the compressed cluster's references (copy-on-write); discard and zeroing drop them too.</item>
/// </list>
/// In a tiered image bit 63 of a compressed entry selects the HDD data file (docs/FORMAT.md §2.3).
/// </summary>
internal sealed partial class QcowCore
{
    private ClusterCodec? _codec;

    /// <summary>Per tier: the next free byte in the host cluster compressed data is being packed into, or 0 (QEMU's free_byte_offset).</summary>
    private readonly long[] _compressedTail = new long[2];

    private ClusterCodec Codec => _codec ??= ClusterCodec.For(Header.CompressionType);

    /// <summary>QEMU's validate_compression_type.</summary>
    private static void CheckCompressionType(QcowHeader h, string? name)
    {
        if (!ClusterCodec.IsKnown(h.CompressionType))
        {
            ThrowHelper.Unsupported(name, QcowHeader.OffsetCompressionType, "compression_type", $"qcow2: unknown compression type: {h.CompressionType}");
        }
        var bit = (h.IncompatibleFeatures & QcowHeader.IncompatCompressionType) != 0;
        if (h.CompressionType == ClusterCodec.TypeZlib && bit)
        {
            ThrowHelper.Corrupt(name, QcowHeader.OffsetIncompatibleFeatures, "incompatible_features", "qcow2: Compression type incompatible feature bit must not be set");
        }
        if (h.CompressionType != ClusterCodec.TypeZlib && !bit)
        {
            ThrowHelper.Corrupt(name, QcowHeader.OffsetIncompatibleFeatures, "incompatible_features", "qcow2: Compression type incompatible feature bit must be set");
        }
    }

    // ---------------------------------------------------------------- reading

    /// <summary>
    /// Bounds a descriptor before anything is read: past the header, inside the file, clear of the
    /// reserved offset bits and (primary file) of metadata. Damage is reported, not flagged in the
    /// header: QEMU too only fails the read.
    /// </summary>
    private CompressedDescriptor ValidateCompressed(ulong entry, int tier, long guestOffset, bool overlapChecked)
    {
        var d = CompressedDescriptor.Decode(entry, _clusterBits);
        var file = DataFile(tier);
        if (d.Offset > CompressedDescriptor.MaxHostOffset)
        {
            ThrowCompressedCorrupt(guestOffset, d, "sets reserved offset bits");
        }
        if (d.Offset < _clusterSize)
        {
            ThrowCompressedCorrupt(guestOffset, d, tier == Hdd ? "overlaps the tier data file header" : "overlaps the image header");
        }
        if (d.Offset >= file.Length)
        {
            ThrowCompressedCorrupt(guestOffset, d, $"lies beyond the end of the file ({file.Length} bytes)");
        }
        if (!overlapChecked)
        {
            lock (_lock)
            {
                CheckCompressedOverlapLocked(entry, tier, guestOffset);
            }
        }
        return d;
    }

    /// <summary>Compressed data inside metadata is damage (lock held; callers with I/O counted active check before counting it).</summary>
    private void CheckCompressedOverlapLocked(ulong entry, int tier, long guestOffset)
    {
        if (tier != Ssd)
        {
            return;
        }
        var d = CompressedDescriptor.Decode(entry, _clusterBits);
        var (first, count) = d.Clusters(_clusterBits);
        for (var c = first; c < first + count; c++)
        {
            var meta = MetadataIn(c << _clusterBits);
            if (meta != Meta.None)
            {
                ThrowCompressedCorrupt(guestOffset & ~(long)(_clusterSize - 1), d, $"overlaps metadata ({Describe(meta)})");
            }
        }
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private void ThrowCompressedCorrupt(long guestOffset, CompressedDescriptor d, string problem)
        => ThrowHelper.Corrupt(Name, d.Offset, "compressed cluster descriptor",
            $"compressed cluster at guest offset 0x{guestOffset:x} (host offset 0x{d.Offset:x}, {d.Size} bytes) {problem}");

    /// <summary>Decompresses one cluster; damaged data becomes a typed error naming the cluster.</summary>
    private void Decompress(ReadOnlySpan<byte> compressed, Span<byte> cluster, long guestOffset, CompressedDescriptor d)
    {
        try
        {
            Codec.Decompress(compressed, cluster);
        }
        catch (InvalidDataException e)
        {
            ThrowCompressedCorrupt(guestOffset, d, $"does not decompress ({(Header.CompressionType == ClusterCodec.TypeZstd ? "zstd" : "deflate")}): {e.Message}");
        }
    }

    /// <summary>Serves part of a compressed cluster (the caller counts the I/O as active, so its host clusters are not reused meanwhile).</summary>
    private void ReadCompressed(ulong entry, int tier, long guestOffset, Span<byte> buffer, bool overlapChecked)
    {
        var clusterStart = guestOffset & ~(long)(_clusterSize - 1);
        var d = ValidateCompressed(entry, tier, clusterStart, overlapChecked);
        var input = ArrayPool<byte>.Shared.Rent(d.Size);
        byte[]? whole = null;
        try
        {
            DataFile(tier).Read(d.Offset, input.AsSpan(0, d.Size));
            var inCluster = (int)(guestOffset - clusterStart);
            if (inCluster == 0 && buffer.Length == _clusterSize)
            {
                Decompress(input.AsSpan(0, d.Size), buffer, clusterStart, d);
                return;
            }
            whole = ArrayPool<byte>.Shared.Rent(_clusterSize);
            Decompress(input.AsSpan(0, d.Size), whole.AsSpan(0, _clusterSize), clusterStart, d);
            whole.AsSpan(inCluster, buffer.Length).CopyTo(buffer);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(input);
            if (whole is not null)
            {
                ArrayPool<byte>.Shared.Return(whole);
            }
        }
    }

    private async ValueTask ReadCompressedAsync(ulong entry, int tier, long guestOffset, Memory<byte> buffer, CancellationToken ct)
    {
        var clusterStart = guestOffset & ~(long)(_clusterSize - 1);
        var d = ValidateCompressed(entry, tier, clusterStart, overlapChecked: true);
        var input = ArrayPool<byte>.Shared.Rent(d.Size);
        var whole = ArrayPool<byte>.Shared.Rent(_clusterSize);
        try
        {
            await DataFile(tier).ReadAsync(d.Offset, input.AsMemory(0, d.Size), ct).ConfigureAwait(false);
            Decompress(input.AsSpan(0, d.Size), whole.AsSpan(0, _clusterSize), clusterStart, d);
            var inCluster = (int)(guestOffset - clusterStart);
            whole.AsSpan(inCluster, buffer.Length).CopyTo(buffer.Span);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(input);
            ArrayPool<byte>.Shared.Return(whole);
        }
    }

    /// <summary>Decompresses a whole compressed cluster for copy-on-write (the entry is pinned by the in-flight guest cluster).</summary>
    private void ReadCompressedCluster(ulong entry, int tier, long guestCluster, Span<byte> cluster)
        => ReadCompressed(entry, tier, guestCluster << _clusterBits, cluster, overlapChecked: false);

    // ---------------------------------------------------------------- freeing (lock held)

    /// <summary>Drops a compressed cluster's references: one from every host cluster its sectors touch, as QEMU's qcow2_free_any_cluster.</summary>
    private void FreeCompressed(ulong entry, int tier)
    {
        var d = CompressedDescriptor.Decode(entry, _clusterBits);
        if (d.Offset < _clusterSize || d.Offset > CompressedDescriptor.MaxHostOffset || d.Offset >= DataFile(tier).Length)
        {
            // Dropping references this entry never held would corrupt other clusters' refcounts.
            SignalCorruption(d.Offset, "compressed cluster descriptor", $"compressed cluster descriptor 0x{entry:x} points outside the file; refusing to free it");
        }
        var (first, count) = d.Clusters(_clusterBits);
        Allocator(tier).QueueFree(first << _clusterBits, count);
    }

    /// <summary>A packing cluster that was freed must not take more compressed data: its space may be handed out whole.</summary>
    private void ForgetCompressedTails(List<long> freedSsd, List<long>? freedHdd)
    {
        ForgetTail(Ssd, freedSsd);
        if (freedHdd is not null)
        {
            ForgetTail(Hdd, freedHdd);
        }

        void ForgetTail(int tier, List<long> freed)
        {
            if (_compressedTail[tier] != 0 && freed.BinarySearch(_compressedTail[tier] >> _clusterBits) >= 0)
            {
                _compressedTail[tier] = 0;
            }
        }
    }

    private void ResetCompressedTails()
    {
        _compressedTail[Ssd] = 0;
        _compressedTail[Hdd] = 0;
    }

    // ---------------------------------------------------------------- writing

    /// <summary>
    /// Writes whole clusters compressed (QEMU's write -c / bdrv_pwrite_compressed): <paramref name="offset"/>
    /// is cluster-aligned and the data covers whole clusters, except that the image's last cluster may
    /// be partial (it is zero-padded). A cluster whose compressed form is not smaller than a cluster is
    /// written uncompressed, as QEMU does. Unlike QEMU, a cluster that is already allocated is replaced
    /// (its old cluster freed) instead of refused.
    /// </summary>
    public void WriteCompressed(long offset, ReadOnlySpan<byte> data)
    {
        CheckCompressedRequest(offset, data.Length);
        var output = ArrayPool<byte>.Shared.Rent(_clusterSize);
        byte[]? padded = null;
        try
        {
            while (!data.IsEmpty)
            {
                var n = Math.Min(_clusterSize, data.Length);
                var cluster = data[..n];
                if (n < _clusterSize)
                {
                    padded = ArrayPool<byte>.Shared.Rent(_clusterSize);
                    cluster.CopyTo(padded);
                    padded.AsSpan(n, _clusterSize - n).Clear();
                    cluster = padded.AsSpan(0, _clusterSize);
                }
                var length = Codec.Compress(cluster, output.AsSpan(0, _clusterSize - 1));
                if (length < 0)
                {
                    Write(offset, data[..n]);
                }
                else
                {
                    Observer?.OnWrite(offset, n);
                    StoreCompressed(offset, output.AsSpan(0, length));
                }
                data = data[n..];
                offset += n;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(output);
            if (padded is not null)
            {
                ArrayPool<byte>.Shared.Return(padded);
            }
        }
    }

    public async ValueTask WriteCompressedAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken ct)
    {
        CheckCompressedRequest(offset, data.Length);
        var output = ArrayPool<byte>.Shared.Rent(_clusterSize);
        var padded = ArrayPool<byte>.Shared.Rent(_clusterSize);
        try
        {
            while (!data.IsEmpty)
            {
                ct.ThrowIfCancellationRequested();
                var n = Math.Min(_clusterSize, data.Length);
                var cluster = data[..n];
                if (n < _clusterSize)
                {
                    cluster.Span.CopyTo(padded);
                    padded.AsSpan(n, _clusterSize - n).Clear();
                    cluster = padded.AsMemory(0, _clusterSize);
                }
                var length = Codec.Compress(cluster.Span, output.AsSpan(0, _clusterSize - 1));
                if (length < 0)
                {
                    await WriteAsync(offset, data[..n], ct).ConfigureAwait(false);
                }
                else
                {
                    Observer?.OnWrite(offset, n);
                    while (true)
                    {
                        var plan = PlanCompressed(offset, length);
                        if (plan.Wait is not null)
                        {
                            await plan.Wait.ConfigureAwait(false);
                            continue;
                        }
                        try
                        {
                            await DataFile(plan.Tier).WriteAsync(plan.Host, output.AsMemory(0, length), CancellationToken.None).ConfigureAwait(false);
                            Volatile.Write(ref _unsynced, 1);
                        }
                        catch
                        {
                            AbortCompressed(plan);
                            throw;
                        }
                        CommitCompressed(plan);
                        break;
                    }
                }
                data = data[n..];
                offset += n;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(output);
            ArrayPool<byte>.Shared.Return(padded);
        }
    }

    private void CheckCompressedRequest(long offset, long length)
    {
        CheckWritable();
        CheckRange(offset, length);
        if ((offset & (_clusterSize - 1)) != 0)
        {
            throw new ArgumentException($"compressed writes must start on a cluster boundary ({_clusterSize} bytes; offset {offset})", nameof(offset));
        }
        if ((length & (_clusterSize - 1)) != 0 && offset + length != Size)
        {
            throw new ArgumentException($"compressed writes must cover whole clusters ({_clusterSize} bytes) or end at the end of the image (offset {offset}, length {length})", nameof(length));
        }
    }

    private struct CompressedPlan
    {
        public Task? Wait;
        public long Host;
        public int Length;
        public int Tier;
        public long GuestCluster;
        public TaskCompletionSource Done;
    }

    /// <summary>Stores one compressed cluster: bytes allocated under the lock, data written outside it, entry installed last.</summary>
    private void StoreCompressed(long offset, ReadOnlySpan<byte> compressed)
    {
        while (true)
        {
            var plan = PlanCompressed(offset, compressed.Length);
            if (plan.Wait is not null)
            {
                plan.Wait.GetAwaiter().GetResult();
                continue;
            }
            try
            {
                DataFile(plan.Tier).Write(plan.Host, compressed);
                Volatile.Write(ref _unsynced, 1);
            }
            catch
            {
                AbortCompressed(plan);
                throw;
            }
            CommitCompressed(plan);
            return;
        }
    }

    private CompressedPlan PlanCompressed(long offset, int length)
    {
        lock (_lock)
        {
            if (_quiesce is not null)
            {
                return new CompressedPlan { Wait = _quiesce.Task };
            }
            var guestCluster = offset >> _clusterBits;
            if (_inflight.TryGetValue(guestCluster, out var pending))
            {
                return new CompressedPlan { Wait = pending.Task };
            }
            MarkDirtyIfLazy();
            GetL2ForWrite((int)(offset >> (_clusterBits + _l2Bits))); // so the commit cannot fail on the table
            var tier = ChooseTier(offset, 1);
            var host = AllocateCompressedBytes(tier, length);
            if (tier == Ssd)
            {
                CheckOverlap(host, length, Meta.None);
            }
            var plan = new CompressedPlan
            {
                Host = host,
                Length = length,
                Tier = tier,
                GuestCluster = guestCluster,
                Done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously),
            };
            _inflight.Add(guestCluster, plan.Done);
            return plan;
        }
    }

    private void CommitCompressed(in CompressedPlan plan)
    {
        lock (_lock)
        {
            var l1Index = (int)(plan.GuestCluster >> _l2Bits);
            var (table, l2Off) = GetL2ForWrite(l1Index);
            var index = (int)(plan.GuestCluster & ((1 << _l2Bits) - 1));
            var old = Entry(table, index);
            if (ClusterKinds.Classify(old) is ClusterKind.Normal or ClusterKind.ZeroAllocated or ClusterKind.Compressed)
            {
                FreeCluster(old);
            }
            var entry = ClusterLayout.Compressed | CompressedDescriptor.Encode(plan.Host, plan.Length, _clusterBits)
                | (plan.Tier == Hdd ? TierExtension.CompressedHddBit : 0);
            SetEntry(table, index, entry);
            if (_extendedL2)
            {
                SetBitmap(table, index, 0); // compressed clusters have no subclusters
            }
            _l2.MarkDirty(l2Off);
            _needSyncBeforeL2 = true;
            _inflight.Remove(plan.GuestCluster);
            plan.Done.SetResult();
        }
    }

    private void AbortCompressed(in CompressedPlan plan)
    {
        lock (_lock)
        {
            var first = plan.Host >> _clusterBits;
            var last = (plan.Host + plan.Length - 1) >> _clusterBits;
            Allocator(plan.Tier).FreeNow(first << _clusterBits, (int)(last - first + 1));
            _compressedTail[plan.Tier] = 0; // never pack next to bytes whose write failed
            _inflight.Remove(plan.GuestCluster);
            plan.Done.SetResult();
        }
    }

    /// <summary>
    /// QEMU's qcow2_alloc_bytes: <paramref name="size"/> bytes (less than a cluster) right after the last
    /// compressed cluster when they fit in its host cluster, or run on into a newly allocated host cluster
    /// that happens to follow it; otherwise at the start of a new host cluster. Every host cluster the
    /// bytes touch gains one reference.
    /// </summary>
    private long AllocateCompressedBytes(int tier, int size)
    {
        var allocator = Allocator(tier);
        var offset = _compressedTail[tier];
        if (offset != 0)
        {
            var refcount = allocator.Get(offset >> _clusterBits);
            if (refcount == 0 || refcount >= allocator.MaxRefcount)
            {
                offset = 0;
            }
        }
        var freeInCluster = offset == 0 ? 0 : _clusterSize - (int)(offset & (_clusterSize - 1));
        if (offset != 0 && freeInCluster >= size)
        {
            allocator.Update(offset >> _clusterBits, 1);
        }
        else
        {
            var fresh = allocator.Allocate(1, out _); // refcount 1: this cluster's reference
            if (offset != 0 && ((offset + _clusterSize - 1) & ~(long)(_clusterSize - 1)) == fresh)
            {
                allocator.Update(offset >> _clusterBits, 1); // runs on from the tail of the previous one
            }
            else
            {
                offset = fresh;
            }
        }
        if (!CompressedDescriptor.OffsetFits(offset + size, _clusterBits))
        {
            throw new QcowException($"{Name ?? "image"}: host offset 0x{offset:x} is too large for a compressed cluster descriptor with {_clusterSize}-byte clusters");
        }
        var next = offset + size;
        _compressedTail[tier] = (next & (_clusterSize - 1)) == 0 ? 0 : next;
        return offset;
    }

    // ---------------------------------------------------------------- tier moves

    /// <summary>
    /// Moves one compressed cluster (already registered in flight by the caller) to the other tier:
    /// decompressed (which validates it) and compressed again into the target's packing cluster, or
    /// stored uncompressed there should it no longer fit. Same order as any move: data, flush, entry,
    /// flush, then the old references are dropped.
    /// </summary>
    private void MoveCompressed(long guestCluster, ulong entry, int target, TaskCompletionSource done)
    {
        var cluster = ArrayPool<byte>.Shared.Rent(_clusterSize);
        var output = ArrayPool<byte>.Shared.Rent(_clusterSize);
        var allocated = false;
        long host = 0;
        var length = 0;
        try
        {
            ReadCompressedCluster(entry, EntryTier(entry), guestCluster, cluster.AsSpan(0, _clusterSize));
            length = Codec.Compress(cluster.AsSpan(0, _clusterSize), output.AsSpan(0, _clusterSize - 1));
            lock (_lock)
            {
                GetL2ForWrite((int)(guestCluster >> _l2Bits));
                if (length < 0)
                {
                    host = Allocator(target).Allocate(1, out _);
                    CountInflight(target, 1);
                }
                else
                {
                    host = AllocateCompressedBytes(target, length);
                }
                allocated = true;
                if (target == Ssd)
                {
                    CheckOverlap(host, length < 0 ? _clusterSize : length, Meta.None);
                }
            }
            var file = DataFile(target);
            file.Write(host, length < 0 ? cluster.AsSpan(0, _clusterSize) : output.AsSpan(0, length));
            file.Flush();
            lock (_lock)
            {
                var (table, l2Off) = GetL2ForWrite((int)(guestCluster >> _l2Bits));
                var idx = (int)(guestCluster & ((1 << _l2Bits) - 1));
                FreeCluster(Entry(table, idx));
                SetEntry(table, idx, length < 0
                    ? (ulong)host | ClusterLayout.Copied | TierBits(target)
                    : ClusterLayout.Compressed | CompressedDescriptor.Encode(host, length, _clusterBits) | (target == Hdd ? TierExtension.CompressedHddBit : 0));
                _l2.MarkDirty(l2Off);
                if (length < 0)
                {
                    EndInflight(target, 1, installed: true);
                }
                _inflight.Remove(guestCluster);
                done.SetResult();
                FlushLocked();
            }
        }
        catch
        {
            lock (_lock)
            {
                if (_inflight.Remove(guestCluster))
                {
                    if (allocated)
                    {
                        var (first, count) = length < 0 ? (host >> _clusterBits, 1) : (host >> _clusterBits, (int)(((host + length - 1) >> _clusterBits) - (host >> _clusterBits) + 1));
                        Allocator(target).FreeNow(first << _clusterBits, count);
                        if (length < 0)
                        {
                            EndInflight(target, 1, installed: false);
                        }
                        _compressedTail[target] = 0;
                    }
                    done.TrySetResult();
                }
            }
            throw;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(cluster);
            ArrayPool<byte>.Shared.Return(output);
        }
    }
}
