using System.Buffers.Binary;
using QcowTier.Format;

namespace QcowTier.Engine;

/// <summary>
/// Internal snapshots (qemu-img snapshot -l/-c/-a/-d). Refcounts follow QEMU's model: an L2 table
/// counts the L1 tables (active and snapshots) that point at it, a data cluster counts the paths
/// L1 → L2 → cluster that reach it; COPIED is set on active entries exactly when the count is 1,
/// so the write planner's copy-on-write of shared tables and clusters keeps the counts right.
/// </summary>
/// <remarks>
/// Crash safety. Every structure that moves (the snapshot table, the active L1 table on apply) is
/// written to new clusters, flushed, and then switched with one write of at most 12 bytes inside
/// the header's first sector; the old one is freed last. What cannot be made atomic is the pairing
/// of a refcount and the COPIED flag that mirrors it (qemu-img check reports either half alone), so on
/// a version 3 image the operation runs under the dirty bit: a power cut in the middle leaves an image
/// that QEMU and QcowTier repair on the next writable open, as with lazy refcounts. The guest data of
/// the active disk and of every snapshot is right at every moment: counts are only ever too high
/// until the frees land, and a cluster is never written in place while it is shared.
/// </remarks>
internal sealed partial class QcowCore
{
    /// <summary>The snapshot table as it is on disk.</summary>
    public List<SnapshotHeader> ReadSnapshots()
    {
        if (_disposed)
        {
            ThrowHelper.Disposed(Name);
        }
        lock (_lock)
        {
            return SnapshotHeader.ReadTable(File, Header, out _);
        }
    }

    /// <summary>Makes this (read-only) core show the disk as it was when the snapshot was taken.</summary>
    public void UseSnapshotView(string nameOrId)
    {
        lock (_lock)
        {
            var list = SnapshotHeader.ReadTable(File, Header, out _);
            var sn = FindSnapshot(list, nameOrId, byName: false);
            _l1 = LoadSnapshotL1(sn);
            _l2 = new MetadataCache(_l2CacheTables, WriteBackL2);
            ForgetActiveL2();
            Volatile.Write(ref _size, sn.DiskSize);
        }
    }

    /// <summary>qemu-img snapshot -c: a new snapshot of the active disk, sharing every cluster with it.</summary>
    public SnapshotHeader CreateSnapshot(string name)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        if (System.Text.Encoding.UTF8.GetByteCount(name) > ushort.MaxValue)
        {
            throw new ArgumentException("the snapshot name is longer than the 65535 bytes its table entry can hold", nameof(name));
        }
        CheckWritable();
        RefuseSnapshotsOnTier();
        return Exclusive(() =>
        {
            FlushLocked();
            var list = SnapshotHeader.ReadTable(File, Header, out var oldSize);
            if (list.Any(s => s.Name == name))
            {
                throw new ArgumentException($"{Name ?? "image"}: a snapshot named '{name}' already exists", nameof(name));
            }
            if (list.Count >= QcowHeader.MaxSnapshots)
            {
                throw new InvalidOperationException($"{Name ?? "image"}: the image already has the maximum of {QcowHeader.MaxSnapshots} snapshots");
            }
            var now = DateTimeOffset.UtcNow;
            var nanos = now.ToUnixTimeMilliseconds() % 1000 * 1_000_000 + now.Ticks % TimeSpan.TicksPerMillisecond * 100;
            var sn = new SnapshotHeader
            {
                Id = NextSnapshotId(list),
                Name = name,
                L1Size = (uint)_l1.Length,
                DateSec = (uint)now.ToUnixTimeSeconds(),
                DateNsec = (uint)nanos,
                DiskSize = _size,
                Icount = 0, // what qemu-img writes when no VM runs
            };
            list.Add(sn);
            var setDirty = BeginSnapshotOperation();

            // 1. The snapshot's own copy of the L1 table (its entries' COPIED flags mean nothing there).
            var l1Clusters = L1Clusters(_l1.Length);
            if (l1Clusters > 0)
            {
                sn.L1TableOffset = _refcounts.Allocate(l1Clusters, out _);
                _refcounts.WriteBack();
                WriteL1Table(sn.L1TableOffset, _l1, l1Clusters, clearCopied: true);
            }

            // 2. Every table and cluster the active disk reaches gains a reference; durable before the
            //    flags drop, so a cut in between leaves only counts that are too high.
            ForEachTree(_l1, +1, clearCopied: false);
            _refcounts.WriteBack();
            File.Flush();
            ForEachTree(_l1, 0, clearCopied: true);
            for (var i = 0; i < _l1.Length; i++)
            {
                _l1[i] &= ~ClusterLayout.Copied;
            }
            WriteL1Table(Header.L1TableOffset, _l1, L1Clusters(_l1.Length), clearCopied: false);
            File.Flush();

            // 3. The table with the new entry, switched in with one header write.
            WriteSnapshotTable(list, oldSize);
            EndSnapshotOperation(setDirty);
            return sn;
        });
    }

    /// <summary>qemu-img snapshot -a: the active disk becomes the snapshot's content (and size).</summary>
    public void ApplySnapshot(string nameOrId, bool byName = false)
    {
        CheckWritable();
        RefuseSnapshotsOnTier();
        Exclusive(() =>
        {
            FlushLocked();
            var list = SnapshotHeader.ReadTable(File, Header, out _);
            var sn = FindSnapshot(list, nameOrId, byName);
            var snL1 = LoadSnapshotL1(sn);
            // Every cluster may change: enabled bitmaps see the whole disk written (IN_USE first).
            TrackWrite(0, _size);
            var setDirty = BeginSnapshotOperation();

            // 1. The snapshot's tables and clusters gain the active disk's reference; their COPIED
            //    flags (stale in an inactive tree) are cleared, since everything is shared from now on.
            ForEachTree(snL1, +1, clearCopied: true);
            _refcounts.WriteBack();
            File.Flush();

            // 2. A new active L1 table, large enough for the current and the snapshot's disk size, so
            //    that every header state a cut can leave is one QEMU accepts.
            var perL1 = (long)_clusterSize << _l2Bits;
            var entries = Math.Max(Math.Max(_l1.Length, (long)sn.L1Size), QcowHeader.CeilDiv(sn.DiskSize, perL1));
            var newL1 = new ulong[entries];
            for (var i = 0; i < snL1.Length; i++)
            {
                newL1[i] = snL1[i] & ~ClusterLayout.Copied;
            }
            var clusters = L1Clusters(newL1.Length);
            var newOff = _refcounts.Allocate(clusters, out _);
            _refcounts.WriteBack();
            WriteL1Table(newOff, newL1, clusters, clearCopied: false);
            File.Flush();

            // 3. Switch: L1 size and offset in one write, then the disk size.
            Span<byte> hdr = stackalloc byte[12];
            BinaryPrimitives.WriteUInt32BigEndian(hdr, (uint)newL1.Length);
            BinaryPrimitives.WriteUInt64BigEndian(hdr[4..], (ulong)newOff);
            File.Write(QcowHeader.OffsetL1Size, hdr);
            File.Flush();
            if (sn.DiskSize != _size)
            {
                ResizeBitmaps(sn.DiskSize);
                TrackWrite(0, sn.DiskSize);
                WriteHeaderU64(QcowHeader.OffsetSize, (ulong)sn.DiskSize);
                File.Flush();
                Header.Size = sn.DiskSize;
                Volatile.Write(ref _size, sn.DiskSize);
            }
            var oldL1 = _l1;
            var oldOff = Header.L1TableOffset;
            Header.L1Size = (uint)newL1.Length;
            Header.L1TableOffset = newOff;
            _l1 = newL1;
            _dirtyL1.Clear();
            ForgetActiveL2();

            // 4. The old active tree loses its reference; the frees land once nothing reads them.
            ForEachTree(oldL1, -1, clearCopied: false);
            QueueFreeRun(oldOff, L1Clusters(oldL1.Length));
            FlushLocked();
            _l2 = new MetadataCache(_l2CacheTables, WriteBackL2);
            EndSnapshotOperation(setDirty);
        });
    }

    /// <summary>qemu-img snapshot -d: drops the snapshot and everything only it referenced.</summary>
    public void DeleteSnapshot(string nameOrId, bool byName = false)
    {
        CheckWritable();
        RefuseSnapshotsOnTier();
        Exclusive(() =>
        {
            FlushLocked();
            var list = SnapshotHeader.ReadTable(File, Header, out var oldSize);
            var sn = FindSnapshot(list, nameOrId, byName);
            var snL1 = LoadSnapshotL1(sn);
            var setDirty = BeginSnapshotOperation();

            // 1. The table without the entry; from here the snapshot's clusters are only counted too high.
            list.Remove(sn);
            WriteSnapshotTable(list, oldSize);

            // 2. Its references go; frees land after the table switch is durable and no read uses them.
            ForEachTree(snL1, -1, clearCopied: false);
            QueueFreeRun(sn.L1TableOffset, L1Clusters((int)sn.L1Size));
            FlushLocked();

            // 3. What the active disk now holds alone gets COPIED (after the decrements are durable,
            //    so the flag never claims a count of one that the disk does not have).
            FixActiveCopiedFlags();
            EndSnapshotOperation(setDirty);
        });
    }

    // ---------------------------------------------------------------- helpers (lock held)

    private HashSet<long>? _snapshotMetaClusters; // clusters of the snapshot table and the inactive L1 tables

    /// <summary>For the overlap check (QEMU's snapshot-table and inactive-l1 checks): built on first need, dropped when the table changes.</summary>
    private bool IsSnapshotMetadata(long clusterOffset)
    {
        if (Header.NbSnapshots == 0)
        {
            return false;
        }
        if (_snapshotMetaClusters is null)
        {
            var set = new HashSet<long>();
            try
            {
                var list = SnapshotHeader.ReadTable(File, Header, out var size);
                AddClusters(set, Header.SnapshotsOffset, size);
                foreach (var sn in list)
                {
                    AddClusters(set, sn.L1TableOffset, sn.L1Size * 8L);
                }
            }
            catch (QcowFormatException)
            {
                // An unreadable table protects nothing; the checker reports it.
            }
            _snapshotMetaClusters = set;
        }
        return _snapshotMetaClusters.Contains(clusterOffset >> _clusterBits);
    }

    private void AddClusters(HashSet<long> set, long offset, long length)
    {
        for (var c = offset >> _clusterBits; length > 0 && c <= (offset + length - 1) >> _clusterBits; c++)
        {
            set.Add(c);
        }
    }

    private void RefuseSnapshotsOnTier()
    {
        if (_tier is not null)
        {
            // Shared clusters would have to follow every move between tiers with all their references.
            ThrowHelper.Unsupported(Name, QcowHeader.OffsetNbSnapshots, "nb_snapshots", "internal snapshots of tiered images are not supported (detach the tier first)");
        }
    }

    /// <summary>Attach refuses an image with snapshots: moves between tiers would have to follow every reference of a shared cluster.</summary>
    private void RefuseTierWithSnapshots()
    {
        if (Header.NbSnapshots != 0)
        {
            ThrowHelper.Unsupported(Name, QcowHeader.OffsetNbSnapshots, "nb_snapshots", $"the image has {Header.NbSnapshots} internal snapshot(s); tiering an image with snapshots is not supported (delete them first)");
        }
    }

    internal void DisposeTierFileOnly() => _hdd?.Dispose();

    /// <summary>Runs <paramref name="body"/> under the lock once no write is in flight; new writes wait for it.</summary>
    private T Exclusive<T>(Func<T> body)
    {
        _checkGate.Wait();
        var gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        try
        {
            lock (_lock)
            {
                _quiesce = gate;
            }
            while (true)
            {
                Task? landing;
                lock (_lock)
                {
                    landing = _inflight.Count == 0 ? null : _inflight.Values.First().Task;
                    if (landing is null)
                    {
                        // In-place writes that started before the gate must land before a cluster they
                        // target can become shared (they hold no lock while writing).
                        var spin = new SpinWait();
                        while (Volatile.Read(ref _activeWrites) != 0)
                        {
                            spin.SpinOnce();
                        }
                        return body();
                    }
                }
                landing.GetAwaiter().GetResult();
            }
        }
        finally
        {
            lock (_lock)
            {
                _quiesce = null;
            }
            gate.SetResult();
            _checkGate.Release();
        }
    }

    private void Exclusive(Action body) => Exclusive(() =>
    {
        body();
        return 0;
    });

    /// <summary>Sets the dirty bit (v3) for the duration of an operation; returns whether it was set here.</summary>
    private bool BeginSnapshotOperation()
    {
        if (Header.Version < 3 || (Header.IncompatibleFeatures & QcowHeader.IncompatDirty) != 0)
        {
            return false;
        }
        Header.IncompatibleFeatures |= QcowHeader.IncompatDirty;
        WriteHeaderU64(QcowHeader.OffsetIncompatibleFeatures, Header.IncompatibleFeatures);
        File.Flush();
        return true;
    }

    private void EndSnapshotOperation(bool setDirty)
    {
        File.Flush();
        if (setDirty)
        {
            Header.IncompatibleFeatures &= ~QcowHeader.IncompatDirty;
            WriteHeaderU64(QcowHeader.OffsetIncompatibleFeatures, Header.IncompatibleFeatures);
            File.Flush();
        }
    }

    private int L1Clusters(long entries) => (int)QcowHeader.CeilDiv(entries * 8, _clusterSize);

    private void QueueFreeRun(long offset, int clusters)
    {
        if (offset != 0 && clusters > 0)
        {
            _refcounts.QueueFree(offset, clusters);
        }
    }

    private void WriteL1Table(long offset, ulong[] l1, int clusters, bool clearCopied)
    {
        if (clusters == 0)
        {
            return;
        }
        var raw = new byte[(long)clusters * _clusterSize];
        for (var i = 0; i < l1.Length; i++)
        {
            BinaryPrimitives.WriteUInt64BigEndian(raw.AsSpan(i * 8), clearCopied ? l1[i] & ~ClusterLayout.Copied : l1[i]);
        }
        // The active table's clusters may hold less than whole clusters of entries: write only the entries there.
        var length = offset == Header.L1TableOffset ? l1.Length * 8 : raw.Length;
        File.Write(offset, raw.AsSpan(0, length));
    }

    private ulong[] LoadSnapshotL1(SnapshotHeader sn)
    {
        var l1 = new ulong[sn.L1Size];
        if (sn.L1Size == 0)
        {
            return l1;
        }
        if (sn.L1TableOffset + sn.L1Size * 8L > File.Length)
        {
            ThrowHelper.Corrupt(Name, sn.L1TableOffset, "snapshot L1 table", $"the L1 table of snapshot {sn.Id} ('{sn.Name}') lies past the end of the file");
        }
        File.Read(sn.L1TableOffset, System.Runtime.InteropServices.MemoryMarshal.AsBytes(l1.AsSpan()));
        if (BitConverter.IsLittleEndian)
        {
            BinaryPrimitives.ReverseEndianness(l1, l1);
        }
        for (var i = 0; i < l1.Length; i++)
        {
            var off = (long)(l1[i] & ClusterLayout.L1OffsetMask);
            if (off != 0 && ((off & (_clusterSize - 1)) != 0 || off < _clusterSize || off + _clusterSize > File.Length))
            {
                ThrowHelper.Corrupt(Name, sn.L1TableOffset + i * 8L, "snapshot L1 entry", $"snapshot {sn.Id} ('{sn.Name}'): L2 table offset 0x{off:x} (L1 index 0x{i:x}) is invalid");
            }
        }
        return l1;
    }

    /// <summary>
    /// Walks one tree: adds <paramref name="delta"/> (+1 now, -1 queued as a free) to every L2 table and
    /// every cluster it reaches, and optionally clears the COPIED flags of its L2 entries in place.
    /// </summary>
    private void ForEachTree(ulong[] l1, int delta, bool clearCopied)
    {
        for (var i = 0; i < l1.Length; i++)
        {
            var l2Off = (long)(l1[i] & ClusterLayout.L1OffsetMask);
            if (l2Off == 0)
            {
                continue;
            }
            var table = ReadL2Uncached(l2Off);
            var changed = false;
            for (var j = 0; j < table.Length / 8; j++)
            {
                var e = Entry(table, j);
                switch (ClusterKinds.Classify(e))
                {
                    case ClusterKind.Normal:
                    case ClusterKind.ZeroAllocated:
                        AddRef((long)(e & ClusterLayout.L2OffsetMask), _clusterSize, delta);
                        if (clearCopied && (e & ClusterLayout.Copied) != 0)
                        {
                            SetEntry(table, j, e & ~ClusterLayout.Copied);
                            changed = true;
                        }
                        break;
                    case ClusterKind.Compressed:
                        var (host, length) = CompressedRange(e);
                        AddRef(host, length, delta);
                        break;
                }
            }
            AddRef(l2Off, _clusterSize, delta);
            if (changed)
            {
                File.Write(l2Off, table);
                // A cached copy (the active table, when shared) must show the same flags.
                _l2.Remove(l2Off);
            }
        }
    }

    private byte[] ReadL2Uncached(long offset)
    {
        var cached = _l2.TryGet(offset);
        if (cached is not null)
        {
            return (byte[])cached.Clone();
        }
        var table = new byte[_clusterSize];
        File.Read(offset, table);
        return table;
    }

    /// <summary>The host bytes a compressed cluster spans (docs/interop/qcow2.txt, "Compressed Clusters Descriptor").</summary>
    private (long Host, long Length) CompressedRange(ulong e)
    {
        var shift = 62 - (_clusterBits - 8);
        var offset = (long)(e & ((1UL << shift) - 1));
        var sectors = (long)((e >> shift) & ((1UL << (_clusterBits - 8)) - 1)) + 1;
        return (offset, sectors * 512 - (offset & 511));
    }

    private void AddRef(long host, long length, int delta)
    {
        if (delta == 0 || length <= 0)
        {
            return;
        }
        var first = host >> _clusterBits;
        var last = (host + length - 1) >> _clusterBits;
        for (var c = first; c <= last; c++)
        {
            if (delta > 0)
            {
                _refcounts.Update(c, delta);
            }
            else
            {
                _refcounts.QueueFree(c << _clusterBits, 1);
            }
        }
    }

    /// <summary>Sets or clears COPIED on every active L1 and L2 entry to match its (durable) refcount.</summary>
    private void FixActiveCopiedFlags()
    {
        var l1Changed = false;
        for (var i = 0; i < _l1.Length; i++)
        {
            var l2Off = (long)(_l1[i] & ClusterLayout.L1OffsetMask);
            if (l2Off == 0)
            {
                continue;
            }
            var table = ReadL2Uncached(l2Off);
            var changed = false;
            for (var j = 0; j < table.Length / 8; j++)
            {
                var e = Entry(table, j);
                if (ClusterKinds.Classify(e) is ClusterKind.Normal or ClusterKind.ZeroAllocated)
                {
                    var one = _refcounts.Get((long)(e & ClusterLayout.L2OffsetMask) >> _clusterBits) == 1;
                    var fixedEntry = one ? e | ClusterLayout.Copied : e & ~ClusterLayout.Copied;
                    if (fixedEntry != e)
                    {
                        SetEntry(table, j, fixedEntry);
                        changed = true;
                    }
                }
            }
            if (changed)
            {
                File.Write(l2Off, table);
                _l2.Remove(l2Off);
            }
            var l1One = _refcounts.Get(l2Off >> _clusterBits) == 1;
            var l1Fixed = l1One ? _l1[i] | ClusterLayout.Copied : _l1[i] & ~ClusterLayout.Copied;
            if (l1Fixed != _l1[i])
            {
                _l1[i] = l1Fixed;
                l1Changed = true;
            }
        }
        if (l1Changed)
        {
            WriteL1Table(Header.L1TableOffset, _l1, L1Clusters(_l1.Length), clearCopied: false);
        }
        File.Flush();
    }

    /// <summary>Writes the table to new clusters, flushes, switches nb_snapshots and snapshots_offset in one write, flushes, frees the old table.</summary>
    private void WriteSnapshotTable(List<SnapshotHeader> list, long oldSize)
    {
        var bytes = SnapshotHeader.Serialize(list);
        long offset = 0;
        if (list.Count > 0)
        {
            var clusters = (int)QcowHeader.CeilDiv(bytes.Length, _clusterSize);
            offset = _refcounts.Allocate(clusters, out _);
            _refcounts.WriteBack();
            var padded = new byte[(long)clusters * _clusterSize];
            bytes.CopyTo(padded, 0);
            File.Write(offset, padded);
        }
        File.Flush();
        Span<byte> hdr = stackalloc byte[12];
        BinaryPrimitives.WriteUInt32BigEndian(hdr, (uint)list.Count);
        BinaryPrimitives.WriteUInt64BigEndian(hdr[4..], (ulong)offset);
        File.Write(QcowHeader.OffsetNbSnapshots, hdr);
        File.Flush();
        var oldOffset = Header.SnapshotsOffset;
        Header.NbSnapshots = (uint)list.Count;
        Header.SnapshotsOffset = offset;
        _snapshotMetaClusters = null;
        if (oldOffset != 0 && oldSize > 0)
        {
            _refcounts.FreeNow(oldOffset, (int)QcowHeader.CeilDiv(oldSize, _clusterSize));
            _refcounts.WriteBack();
            File.Flush();
        }
    }

    private static string NextSnapshotId(List<SnapshotHeader> list)
    {
        // As QEMU: one more than the largest numeric id.
        ulong max = 0;
        foreach (var s in list)
        {
            if (ulong.TryParse(s.Id, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var id) && id > max)
            {
                max = id;
            }
        }
        return (max + 1).ToString(System.Globalization.CultureInfo.InvariantCulture);
    }

    /// <summary>By id, then by name (QEMU's find_snapshot_by_id_or_name); by name only for qemu-img snapshot -d.</summary>
    private SnapshotHeader FindSnapshot(List<SnapshotHeader> list, string nameOrId, bool byName)
    {
        ArgumentNullException.ThrowIfNull(nameOrId);
        var sn = (byName ? null : list.FirstOrDefault(s => s.Id == nameOrId)) ?? list.FirstOrDefault(s => s.Name == nameOrId);
        if (sn is null)
        {
            throw new QcowSnapshotNotFoundException($"{Name ?? "image"}: snapshot '{nameOrId}' not found", Name, nameOrId);
        }
        return sn;
    }
}
