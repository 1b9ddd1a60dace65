using QcowTier.Format;

namespace QcowTier.Engine;

/// <summary>
/// Preallocation (qemu-img create/resize --preallocation): every guest cluster of a range gets an L2
/// entry pointing at a data cluster of its own, as QEMU's preallocate_co does. metadata leaves the data
/// sparse, falloc reserves it in the file system, full writes zeroes over it. On a tiered image each run
/// goes where a write at that offset would (pins, default tier, SSD budget).
/// </summary>
internal sealed partial class QcowCore
{
    /// <summary>A run of newly linked data clusters, contiguous in one file.</summary>
    private readonly record struct PreallocRun(int Tier, long Host, long Clusters, bool Fresh);

    /// <summary>Links every unallocated cluster of guest [from, to) to a new data cluster (lock held; L1 already big enough).</summary>
    private void PreallocateLocked(QcowPreallocation mode, long from, long to)
    {
        if (to <= from)
        {
            return;
        }
        MarkDirtyIfLazy();
        var perTable = 1 << _l2Bits;
        var first = from >> _clusterBits; // the cluster holding the old end may be partly in use: it is skipped when allocated
        var total = QcowHeader.CeilDiv(to, _clusterSize);
        var runs = new List<PreallocRun>();
        if (mode is QcowPreallocation.Falloc or QcowPreallocation.Full)
        {
            // As QEMU: the tables first, so the data that will be reserved or written is one contiguous run.
            for (var t = (int)(first >> _l2Bits); t <= (int)((total - 1) >> _l2Bits); t++)
            {
                GetL2ForWrite(t);
            }
        }
        for (var c = first; c < total;)
        {
            var l1Index = (int)(c >> _l2Bits);
            var (table, l2Off) = GetL2ForWrite(l1Index);
            var idx = (int)(c & (perTable - 1));
            var stop = (int)Math.Min(perTable, idx + (total - c));
            while (idx < stop)
            {
                if (!NeedsPrealloc(Entry(table, idx)))
                {
                    idx++;
                    continue;
                }
                var end = idx + 1;
                while (end < stop && NeedsPrealloc(Entry(table, end)))
                {
                    end++;
                }
                var guest = (((long)l1Index << _l2Bits) + idx) << _clusterBits;
                var count = (int)QcowHeader.CeilDiv(ClipToPins(guest, (long)(end - idx) << _clusterBits), _clusterSize);
                var tier = ChooseTier(guest, count);
                if (tier == Hdd && SsdRoom(guest) is var room and > 0 && room < count)
                {
                    // As for writes: fill what the SSD budget has left, the rest goes to HDD.
                    tier = Ssd;
                    count = (int)room;
                }
                var host = AllocateData(tier, guest >> _clusterBits, count, out var fresh);
                CountAllocated(tier, count);
                for (var i = 0; i < count; i++)
                {
                    SetEntry(table, idx + i, (ulong)(host + ((long)i << _clusterBits)) | ClusterLayout.Copied | TierBits(tier));
                }
                AddRun(runs, new PreallocRun(tier, host, count, fresh));
                idx += count;
            }
            _l2.MarkDirty(l2Off);
            _needSyncBeforeL2 = true;
            c = (long)(l1Index + 1) << _l2Bits;
        }
        FillPreallocated(mode, runs);
        // The data (for full) and the refcounts are made durable before the L2 tables point at them.
        FlushLocked();
    }

    /// <summary>Unallocated and plain zero clusters get a data cluster; allocated ones keep theirs.</summary>
    private bool NeedsPrealloc(ulong entry) => Kind(entry) is ClusterKind.Unallocated or ClusterKind.ZeroPlain;

    private void AddRun(List<PreallocRun> runs, PreallocRun run)
    {
        if (runs.Count > 0 && runs[^1] is var last && last.Tier == run.Tier && last.Fresh == run.Fresh
            && last.Host + (last.Clusters << _clusterBits) == run.Host)
        {
            runs[^1] = last with { Clusters = last.Clusters + run.Clusters };
            return;
        }
        runs.Add(run);
    }

    private void FillPreallocated(QcowPreallocation mode, List<PreallocRun> runs)
    {
        var ends = new long[2];
        byte[]? zeroes = null;
        foreach (var run in runs)
        {
            var file = DataFile(run.Tier);
            var bytes = run.Clusters << _clusterBits;
            ends[run.Tier] = Math.Max(ends[run.Tier], run.Host + bytes);
            if (mode == QcowPreallocation.Full || !run.Fresh)
            {
                // A reused cluster holds stale bytes: it must read as zeroes whatever the mode.
                zeroes ??= new byte[Math.Max(_clusterSize, 1 << 20)];
                for (long done = 0; done < bytes;)
                {
                    var n = (int)Math.Min(zeroes.Length, bytes - done);
                    file.Write(run.Host + done, zeroes.AsSpan(0, n));
                    done += n;
                }
                Volatile.Write(ref _unsynced, 1);
            }
            else if (mode == QcowPreallocation.Falloc)
            {
                file.Allocate(run.Host, bytes);
                Volatile.Write(ref _unsynced, 1);
            }
        }
        // metadata: the data stays sparse; extend the file over it without writing (QEMU truncates the same way).
        for (var tier = 0; tier < 2; tier++)
        {
            if (ends[tier] > 0 && DataFile(tier).Length < ends[tier])
            {
                DataFile(tier).SetLength(ends[tier]);
            }
        }
    }
}
