using System.Buffers.Binary;
using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Check;

/// <summary>
/// One run of qemu-img check over a qcow2 image (QEMU's qcow2_co_check_locked): read the snapshot
/// table, count every reference to every host cluster, compare with the refcounts on disk, check the
/// COPIED flags, and repair what the mode allows. A tiered image (docs/FORMAT.md §2) is checked the
/// same way in two refcount spaces: the primary file's clusters and the HDD data file's.
/// </summary>
/// <remarks>
/// Repairs are ordered so that a crash at any point leaves at worst leaked clusters: refcount
/// increases and decreases are made durable before any COPIED flag is set on their strength; a
/// rebuilt refcount structure is written past the end of the file and flushed before the header
/// points at it with one write; an L2 entry otherwise only ever changes to drop a reference.
/// </remarks>
internal sealed class CheckPass
{
    /// <summary>QEMU's L1E_OFFSET_MASK / L2E_OFFSET_MASK.</summary>
    private const ulong OffsetMask = ClusterLayout.L1OffsetMask;

    private readonly ImageStorage _file;
    private readonly QcowHeader _header;
    private readonly bool _fixLeaks;
    private readonly bool _fixErrors;
    private readonly int _clusterBits;
    private readonly int _clusterSize;
    private readonly int _l2Entries;
    private readonly int _entryBytes; // 8, or 16 with extended L2 (descriptor, then subcluster bitmap)
    private readonly bool _extendedL2;
    private readonly int _csizeShift;
    private readonly ulong _csizeMask;
    private readonly ulong _compressedOffsetMask;
    private readonly CheckLog _log;
    private readonly ImageStorage? _tierFile;
    private List<SnapshotEntry> _snapshots = [];
    private long _snapshotsSize;
    private BitmapsExtension? _bitmaps;
    private TierExtension? _tier;
    private HeaderExtension? _tierExtension;
    private RefcountSpace _primary = null!;
    private RefcountSpace? _hdd;
    private List<(long Start, long End, bool ActiveL2)>? _metadata;
    private bool _signaledUnreadableBlock;

    /// <summary>The refcount part of the result (QEMU's refcount_res): the one rebuilds reset and restore.</summary>
    private CheckCounters _counters;

    /// <summary>The snapshot table part (QEMU's snapshot_res), added at the end.</summary>
    private CheckCounters _snapshotCounters;

    /// <summary>Problems found outside QEMU's own accounting (an unusable bitmaps extension, I/O errors).</summary>
    private CheckCounters _extraCounters;

    public CheckPass(ImageStorage file, QcowHeader header, QcowRepairMode mode, CheckLog log, ImageStorage? tierFile = null)
    {
        _file = file;
        _tierFile = tierFile;
        _header = header;
        _fixLeaks = mode != QcowRepairMode.None;
        _fixErrors = mode == QcowRepairMode.All;
        _clusterBits = header.ClusterBits;
        _clusterSize = header.ClusterSize;
        _extendedL2 = (header.IncompatibleFeatures & QcowHeader.IncompatExtendedL2) != 0;
        _entryBytes = _extendedL2 ? 16 : 8;
        _l2Entries = _clusterSize / _entryBytes;
        _csizeShift = 62 - (_clusterBits - 8);
        _csizeMask = (1UL << (_clusterBits - 8)) - 1;
        _compressedOffsetMask = (1UL << _csizeShift) - 1;
        _log = log;
    }

    public CheckCounters Totals => _counters + _snapshotCounters + _extraCounters;

    /// <summary>The check could not complete (QEMU's negative return: qemu-img prints "Check failed").</summary>
    public bool Failed { get; private set; }

    public long ImageEndOffset { get; private set; }

    public long TotalClusters { get; private set; }

    public long AllocatedClusters { get; private set; }

    public long FragmentedClusters { get; private set; }

    public long CompressedClusters { get; private set; }

    public void Execute()
    {
        try
        {
            if (!ReadSnapshotTable())
            {
                Fail();
                return;
            }
            _bitmaps = BitmapDirectory.Find(_header, out var bitmapError);
            if (bitmapError is not null)
            {
                // QEMU refuses to open such an image at all; we were opened, so we say why QEMU would not be.
                _log.Add($"ERROR {bitmapError}");
                _extraCounters.CheckErrors++;
            }
            if (!CheckRefcounts())
            {
                Fail();
            }
        }
        catch (IOException ex) when (ex is not QcowException)
        {
            _log.Add($"ERROR: I/O error during the check: {ex.Message}");
            _extraCounters.CheckErrors++;
            Failed = true;
        }
    }

    private void Fail()
    {
        Failed = true;
        if (Totals.CheckErrors == 0)
        {
            // QEMU reports a failed check through its return value; our result carries it as a check error.
            _extraCounters.CheckErrors++;
        }
    }

    // ------------------------------------------------------------------ reporting

    private void Corruption(string message)
    {
        _counters.Corruptions++;
        _log.Add(message);
    }

    private void Note(string message) => _log.Add(message);

    private static string Hex0x(ulong v) => v == 0 ? "0" : $"0x{v:x}";

    // ------------------------------------------------------------------ snapshot table

    private bool ReadSnapshotTable()
    {
        var list = SnapshotTable.Read(_file, _header, out _snapshotsSize, out var error);
        if (list is null)
        {
            _snapshotCounters.CheckErrors++;
            _log.Add(error!);
            _snapshots = [];
            _snapshotsSize = 0;
            return false;
        }
        _snapshots = list;
        if (_header.Version >= 3)
        {
            foreach (var sn in _snapshots)
            {
                if (sn.ExtraDataSize < SnapshotTable.MinV3ExtraData)
                {
                    // QEMU -r all rewrites the snapshot table here; the checker does not, so it stays reported.
                    _snapshotCounters.Corruptions++;
                    _log.Add($"ERROR snapshot table entry {sn.Index} is incomplete");
                }
            }
        }
        return true;
    }

    // ------------------------------------------------------------------ qcow2_check_refcounts

    private bool CheckRefcounts()
    {
        var clusters = ClustersFor(_file.Length);
        if (clusters > int.MaxValue)
        {
            _counters.CheckErrors++;
            _log.Add($"ERROR the file spans {clusters} clusters, more than qemu-img check handles");
            return false;
        }
        TotalClusters = ClustersFor((_header.Size + 511) & ~511L);
        if (!FindTier())
        {
            return false;
        }
        LoadSpaces(0);
        if (!CalculateRefcounts(_fixErrors))
        {
            return false;
        }

        var beforeCompare = _counters;
        CompareAll(fixLeaks: false, fixErrors: false);

        if (NeedsRebuild && _fixErrors)
        {
            var old = _counters;
            if (!RebuildRefcountStructures())
            {
                return false;
            }
            _counters.Corruptions = 0;
            _counters.Leaks = 0;
            LoadSpaces(_primary.Refs.Length);
            if (!CalculateRefcounts(fixErrors: false))
            {
                return false;
            }
            var freshLeaks = 0;
            if (_fixLeaks)
            {
                // The old structure is now leaked: free it. Only leaks this cannot fix are reported.
                var saved = _counters;
                _counters = default;
                CompareAll(fixLeaks: true, fixErrors: false);
                if (NeedsRebuild)
                {
                    Note("ERROR rebuilt refcount structure is still broken");
                }
                freshLeaks = _counters.Leaks;
                _counters = saved;
            }
            if (_counters.Corruptions < old.Corruptions)
            {
                _counters.CorruptionsFixed += old.Corruptions - _counters.Corruptions;
            }
            if (_counters.Leaks < old.Leaks)
            {
                _counters.LeaksFixed += old.Leaks - _counters.Leaks;
            }
            _counters.Leaks += freshLeaks;
        }
        else if (_fixLeaks)
        {
            if (NeedsRebuild)
            {
                Note("ERROR need to rebuild refcount structures");
                _counters.CheckErrors++;
                return false;
            }
            if (_counters.Leaks != 0 || _counters.Corruptions != 0)
            {
                _counters = beforeCompare;
                CompareAll(_fixLeaks, _fixErrors);
            }
        }

        if (!CheckOflagCopied())
        {
            return false;
        }
        ImageEndOffset = (_primary.Highest + 1) << _clusterBits;
        return true;
    }

    private bool NeedsRebuild => _primary.NeedsRebuild || _hdd is { NeedsRebuild: true };

    /// <summary>
    /// A tiered image has incompatible bit 63 and the TIER extension. The extension without the bit is
    /// the remainder of an interrupted attach or detach: the image is plain, and what only the
    /// extension references is leaked.
    /// </summary>
    private bool FindTier()
    {
        if ((_header.IncompatibleFeatures & TierExtension.IncompatMask) == 0)
        {
            return true;
        }
        _tierExtension = _header.Extensions.FirstOrDefault(e => e.Type == TierExtension.Type);
        if (_tierExtension is null)
        {
            Note("ERROR incompatible feature bit 63 (QcowTier tiered layout) is set, but the image has no TIER header extension");
            _counters.CheckErrors++;
            return false;
        }
        if (_tierFile is null)
        {
            ThrowHelper.Unsupported(_file.Name, QcowHeader.OffsetIncompatibleFeatures, "incompatible_features", "checking a tiered image needs its tier data file");
        }
        _tier = TierExtension.Parse(_tierExtension.Data, _tierExtension.Offset, _file.Name);
        return true;
    }

    /// <summary>Sizes the reference counts from the files' lengths and reads the refcount tables the image points to now.</summary>
    private void LoadSpaces(long minPrimaryClusters)
    {
        var primaryLength = _file.Length;
        var primaryRefs = new ReferenceCounts(Math.Max(ClustersFor(primaryLength), minPrimaryClusters), _clusterBits, RefcountBlock.MaxValue(_header.RefcountOrder),
            primaryLength, Corruption, Note, _file.Name);
        _primary = new RefcountSpace("", _file, primaryRefs,
            OnDiskRefcounts.Load(_file, _header.RefcountTableOffset, _header.RefcountTableClusters, _clusterBits, _header.RefcountOrder));
        _hdd = null;
        if (_tier is not null)
        {
            var hddLength = _tierFile!.Length;
            var hddRefs = new ReferenceCounts(ClustersFor(hddLength), _clusterBits, RefcountBlock.MaxValue(_header.RefcountOrder),
                hddLength, Corruption, Note, _tierFile.Name, "the tier data file");
            _hdd = new RefcountSpace("HDD ", _tierFile, hddRefs,
                OnDiskRefcounts.Load(_file, _tier.HddRefcountTableOffset, _tier.HddRefcountTableClusters, _clusterBits, _header.RefcountOrder));
        }
    }

    private long ClustersFor(long bytes) => (bytes + _clusterSize - 1) >> _clusterBits;

    /// <summary>Counts every reference the metadata makes (calculate_refcounts).</summary>
    private bool CalculateRefcounts(bool fixErrors)
    {
        AllocatedClusters = 0;
        FragmentedClusters = 0;
        CompressedClusters = 0;
        var refs = _primary.Refs;

        refs.Add(0, _clusterSize);
        // Cluster 0 of the HDD data file is its header.
        _hdd?.Refs.Add(0, _clusterSize);
        if (!CheckL1((ulong)_header.L1TableOffset, _header.L1Size, fragInfo: true, fixErrors))
        {
            return false;
        }
        foreach (var sn in _snapshots)
        {
            if ((sn.L1TableOffset & (ulong)(_clusterSize - 1)) != 0)
            {
                Corruption($"ERROR snapshot {sn.Id} ({sn.Name}) l1_offset={Hex0x(sn.L1TableOffset)}: L1 table is not cluster aligned; snapshot table entry corrupted");
                continue;
            }
            if (sn.L1Size > QcowHeader.MaxL1Bytes / 8)
            {
                Corruption($"ERROR snapshot {sn.Id} ({sn.Name}) l1_size={Hex0x(sn.L1Size)}: L1 table is too large; snapshot table entry corrupted");
                continue;
            }
            if (!CheckL1(sn.L1TableOffset, sn.L1Size, fragInfo: false, fixErrors))
            {
                return false;
            }
        }
        refs.Add(_header.SnapshotsOffset, _snapshotsSize);
        refs.Add(_header.RefcountTableOffset, (long)_header.RefcountTableClusters * _clusterSize);
        if (_tier is not null)
        {
            // The HDD refcount table and the hints table are stored in (and counted by) the primary file.
            refs.Add(_tier.HddRefcountTableOffset, (long)_tier.HddRefcountTableClusters * _clusterSize);
            refs.Add(_tier.HintsCount == 0 ? 0 : _tier.HintsOffset, (long)_tier.HintsCount * TierExtension.HintEntrySize);
        }
        CountCryptoHeader(refs);
        if (!CheckBitmaps(refs))
        {
            return false;
        }
        _primary.NeedsRebuild = false;
        CheckRefblocks(_primary, fixErrors);
        if (_hdd is not null)
        {
            _hdd.NeedsRebuild = false;
            CheckRefblocks(_hdd, fixErrors);
        }
        return true;
    }

    private void CountCryptoHeader(ReferenceCounts refs)
    {
        // QEMU counts the LUKS header only for LUKS images; such images are never opened by this engine, but
        // counting it keeps the check honest should one get here.
        if (_header.CryptMethod != 2)
        {
            return;
        }
        var ext = _header.Extensions.FirstOrDefault(e => e.Type == HeaderExtension.FullDiskEncryption);
        if (ext is { Data.Length: >= 16 })
        {
            var offset = BinaryPrimitives.ReadUInt64BigEndian(ext.Data);
            var length = BinaryPrimitives.ReadUInt64BigEndian(ext.Data.AsSpan(8));
            if (offset <= long.MaxValue && length <= long.MaxValue)
            {
                refs.Add((long)offset, (long)length);
            }
        }
    }

    /// <summary>qcow2_check_bitmaps_refcounts: a broken directory or table fails the whole check, as in QEMU.</summary>
    private bool CheckBitmaps(ReferenceCounts refs)
    {
        if (_bitmaps is null)
        {
            return true;
        }
        refs.Add(AsOffset(_bitmaps.DirectoryOffset), (long)_bitmaps.DirectorySize);
        var list = BitmapDirectory.Load(_file, _header, _bitmaps);
        if (list is null)
        {
            Corruption($"ERROR the bitmap directory at 0x{_bitmaps.DirectoryOffset:x} is broken");
            return false;
        }
        foreach (var bm in list)
        {
            refs.Add(AsOffset(bm.TableOffset), (long)bm.TableSize * 8);
            var data = BitmapDirectory.LoadTable(_file, _header, bm);
            if (data is null)
            {
                Corruption($"ERROR bitmap '{bm.Name}': invalid entry in the bitmap table at 0x{bm.TableOffset:x}");
                return false;
            }
            foreach (var off in data)
            {
                refs.Add((long)off, _clusterSize);
            }
        }
        return true;
    }

    /// <summary>An on-disk offset as the signed value QEMU hands to its reference counting (negative is out of range).</summary>
    private static long AsOffset(ulong offset) => offset > long.MaxValue ? -1 : (long)offset;

    // ------------------------------------------------------------------ L1 / L2

    private bool CheckL1(ulong l1Offset, uint l1Size, bool fragInfo, bool fixErrors)
    {
        if (l1Size == 0)
        {
            return true;
        }
        var refs = _primary.Refs;
        var bytes = (long)l1Size * 8;
        refs.Add(AsOffset(l1Offset), bytes);
        var l1 = ReadTable(l1Offset, l1Size);
        var l2 = new byte[_clusterSize];
        for (var i = 0; i < l1.Length; i++)
        {
            var entry = l1[i];
            if (entry == 0)
            {
                continue;
            }
            if ((entry & ClusterLayout.L1ReservedMask) != 0)
            {
                Corruption($"ERROR found L1 entry with reserved bits set: {entry:x}");
            }
            var l2Offset = entry & OffsetMask;
            refs.Add((long)l2Offset, _clusterSize);
            if ((l2Offset & (ulong)(_clusterSize - 1)) != 0)
            {
                Corruption($"ERROR l2_offset={l2Offset:x}: Table is not cluster aligned; L1 entry corrupted");
            }
            if (!CheckL2(l2Offset, l2, fragInfo, fixErrors))
            {
                return false;
            }
        }
        return true;
    }

    /// <summary>
    /// Reads a table of big-endian 64-bit entries. Entries past the end of the file would read as zero,
    /// which every walk skips, so only the part inside the file is returned (and allocated).
    /// </summary>
    private ulong[] ReadTable(ulong offset, uint entries)
    {
        var length = (ulong)_file.Length;
        var inFile = offset >= length ? 0 : (long)Math.Min((ulong)entries, (length - offset + 7) / 8);
        var table = new ulong[inFile];
        if (inFile > 0)
        {
            var raw = new byte[inFile * 8];
            CheckIo.ReadZeroPadded(_file, offset, raw);
            for (var i = 0; i < inFile; i++)
            {
                table[i] = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
            }
        }
        return table;
    }

    private bool CheckL2(ulong l2Offset, byte[] l2, bool fragInfo, bool fixErrors)
    {
        CheckIo.ReadZeroPadded(_file, l2Offset, l2);
        ulong nextContiguous = 0;
        RefcountSpace? lastSpace = null;
        for (var i = 0; i < _l2Entries; i++)
        {
            var entry = BinaryPrimitives.ReadUInt64BigEndian(l2.AsSpan(i * _entryBytes));
            if (_extendedL2)
            {
                CheckSubclusterBitmap(entry, BinaryPrimitives.ReadUInt64BigEndian(l2.AsSpan(i * 16 + 8)), i);
            }
            if (entry == 0)
            {
                continue;
            }
            var type = Classify(entry);
            if (type == EntryType.Unallocated && ExternalData && (entry & ClusterLayout.Copied) != 0)
            {
                type = EntryType.Normal; // offset 0 of an external data file (QEMU tells it apart by COPIED)
            }
            var space = SpaceOf(entry, type);
            if (type != EntryType.Compressed && (entry & ReservedMask(type)) != 0)
            {
                Corruption($"ERROR found l2 entry with reserved bits set: {entry:x}");
            }
            var refs = space.Refs;
            switch (type)
            {
                case EntryType.Compressed:
                    {
                        // In a tiered image bit 63 of a compressed entry selects the tier instead.
                        if (_tier is null && (entry & ClusterLayout.Copied) != 0)
                        {
                            Corruption($"ERROR: coffset=0x{entry & _compressedOffsetMask:x}: copied flag must never be set for compressed clusters");
                            entry &= ~ClusterLayout.Copied;
                        }
                        var coffset = entry & _compressedOffsetMask;
                        var sectors = ((entry >> _csizeShift) & _csizeMask) + 1;
                        var csize = (long)(sectors * 512 - (coffset & 511));
                        refs.Add((long)coffset, csize);
                        if (fragInfo)
                        {
                            AllocatedClusters++;
                            CompressedClusters++;
                            // Compressed clusters are fragmented by nature: adjacent ones share sectors.
                            FragmentedClusters++;
                        }
                        break;
                    }
                case EntryType.ZeroAllocated:
                case EntryType.Normal:
                    {
                        var offset = entry & OffsetMask;
                        if ((offset & (ulong)(_clusterSize - 1)) != 0)
                        {
                            _counters.Corruptions++;
                            if ((entry & ClusterLayout.Zero) != 0)
                            {
                                Note($"{(fixErrors ? "Repairing" : "ERROR")} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.");
                                if (fixErrors)
                                {
                                    var fixedIt = FixL2EntryByZero(l2Offset, l2, i, out var abort);
                                    if (abort)
                                    {
                                        return false;
                                    }
                                    if (fixedIt)
                                    {
                                        continue;
                                    }
                                }
                            }
                            else
                            {
                                Note($"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.");
                            }
                        }
                        if (fragInfo)
                        {
                            AllocatedClusters++;
                            if (nextContiguous != 0 && (offset != nextContiguous || space != lastSpace))
                            {
                                FragmentedClusters++;
                            }
                            nextContiguous = offset + (ulong)_clusterSize;
                            lastSpace = space;
                        }
                        if (!ExternalData)
                        {
                            refs.Add((long)offset, _clusterSize);
                        }
                        break;
                    }
                default:
                    break;
            }
        }
        return true;
    }

    /// <summary>Clusters of a QEMU external data file are not refcounted (qcow2.txt, incompatible bit 2).</summary>
    private bool ExternalData => (_header.IncompatibleFeatures & QcowHeader.IncompatExternalDataFile) != 0;

    /// <summary>QEMU's subcluster bitmap checks (check_refcounts_l2, extended L2).</summary>
    private void CheckSubclusterBitmap(ulong entry, ulong bitmap, int index)
    {
        var type = Classify(entry);
        if (type == EntryType.Compressed)
        {
            if (bitmap != 0)
            {
                Corruption($"ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, entry=0x{entry:x}");
            }
        }
        else if (type == EntryType.Normal)
        {
            if (((bitmap >> 32) & bitmap) != 0)
            {
                Corruption($"ERROR offset={entry & OffsetMask:x}: Allocated cluster has corrupted subcluster allocation bitmap");
            }
        }
        else if ((bitmap & 0xffffffffUL) != 0)
        {
            Corruption("ERROR: Unallocated cluster has non-zero subcluster allocation map");
        }
    }

    private enum EntryType
    {
        Unallocated,
        ZeroPlain,
        ZeroAllocated,
        Normal,
        Compressed,
    }

    /// <summary>Which file an L2 entry's cluster lives in (always the primary for a plain image).</summary>
    private RefcountSpace SpaceOf(ulong entry, EntryType type)
    {
        if (_hdd is null)
        {
            return _primary;
        }
        var hdd = type switch
        {
            EntryType.Compressed => (entry & TierExtension.CompressedHddBit) != 0,
            EntryType.Normal or EntryType.ZeroAllocated => (entry & TierExtension.L2HddBit) != 0,
            _ => false,
        };
        return hdd ? _hdd : _primary;
    }

    /// <summary>Reserved bits of a standard entry; in a tiered image, bit 61 names the tier of an allocated cluster.</summary>
    private ulong ReservedMask(EntryType type)
        => _tier is not null && type is EntryType.Normal or EntryType.ZeroAllocated
            ? ClusterLayout.L2ReservedMask & ~TierExtension.L2HddBit
            : ClusterLayout.L2ReservedMask;

    /// <summary>QEMU's qcow2_get_cluster_type for images without a data file (with subclusters, bit 0 is not a zero flag).</summary>
    private EntryType Classify(ulong entry)
    {
        if ((entry & ClusterLayout.Compressed) != 0)
        {
            return EntryType.Compressed;
        }
        var hasOffset = (entry & OffsetMask) != 0;
        if ((entry & ClusterLayout.Zero) != 0 && !_extendedL2)
        {
            return hasOffset ? EntryType.ZeroAllocated : EntryType.ZeroPlain;
        }
        return hasOffset ? EntryType.Normal : EntryType.Unallocated;
    }

    /// <summary>
    /// Turns a preallocated zero cluster with an unaligned offset into a plain zero cluster. Dropping the
    /// reference can only leak the cluster it pointed into, so this write needs no ordering.
    /// </summary>
    private bool FixL2EntryByZero(ulong l2Offset, byte[] l2, int index, out bool abort)
    {
        abort = false;
        if ((l2Offset & (ulong)(_clusterSize - 1)) != 0)
        {
            // The "table" is not where any L2 table can be; writing into it would damage whatever is there.
            Note("ERROR: L2 table offset unaligned; not repairing its entries");
            return false;
        }
        var entryOffset = (long)l2Offset + index * (long)_entryBytes;
        if (OverlapsMetadata(entryOffset, 8, allowActiveL2: true) || entryOffset + 8 > _file.Length)
        {
            Note("ERROR: Overlap check failed");
            _counters.CheckErrors++;
            abort = true;
            return false;
        }
        BinaryPrimitives.WriteUInt64BigEndian(l2.AsSpan(index * _entryBytes), ClusterLayout.Zero);
        _file.Write(entryOffset, l2.AsSpan(index * _entryBytes, 8));
        _file.Flush();
        _counters.Corruptions--;
        _counters.CorruptionsFixed++;
        return true;
    }

    // ------------------------------------------------------------------ refcount blocks

    /// <summary>
    /// check_refblocks: every refcount block must be aligned, inside the image and used once. Blocks of
    /// either space live in the primary file and are counted there.
    /// </summary>
    private void CheckRefblocks(RefcountSpace space, bool fixErrors)
    {
        var refs = _primary.Refs;
        var label = space.Label;
        for (var i = 0; i < space.OnDisk.TableEntries; i++)
        {
            var raw = space.OnDisk.Entry(i);
            var offset = raw & OnDiskRefcounts.OffsetMask;
            var cluster = offset >> _clusterBits;
            if ((raw & OnDiskRefcounts.ReservedMask) != 0)
            {
                Corruption($"ERROR {label}refcount table entry {i} has reserved bits set");
                space.NeedsRebuild = true;
                continue;
            }
            if ((offset & (ulong)(_clusterSize - 1)) != 0)
            {
                Corruption($"ERROR {label}refcount block {i} is not cluster aligned; refcount table entry corrupted");
                space.NeedsRebuild = true;
                continue;
            }
            if (cluster >= (ulong)refs.Length)
            {
                _counters.Corruptions++;
                Note($"{(fixErrors ? "Repairing" : "ERROR")} {label}refcount block {i} is outside image");
                if (fixErrors)
                {
                    if (TryExtendFileFor(offset, refs))
                    {
                        _counters.Corruptions--;
                        _counters.CorruptionsFixed++;
                        refs.Add((long)offset, _clusterSize);
                        continue;
                    }
                    space.NeedsRebuild = true;
                    Note("ERROR could not resize image: File too large");
                }
                continue;
            }
            if (offset != 0)
            {
                refs.Add((long)offset, _clusterSize);
                var count = refs[(long)cluster];
                if (count != 1)
                {
                    Corruption($"ERROR {label}refcount block {i} refcount={count}");
                    space.NeedsRebuild = true;
                }
            }
        }
    }

    /// <summary>
    /// Extends the file so that a refcount block just past its end exists (it then reads as zeroes).
    /// Only a modest extension is made: an entry pointing far away is rebuilt rather than honoured.
    /// </summary>
    private bool TryExtendFileFor(ulong offset, ReferenceCounts refs)
    {
        var length = _file.Length;
        var limit = Math.Max(2 * length, length + (1L << 30));
        if (offset > (ulong)(limit - _clusterSize))
        {
            return false;
        }
        var newLength = (long)offset + _clusterSize;
        if (ClustersFor(newLength) > ReferenceCounts.MaxClusters)
        {
            return false;
        }
        _file.SetLength(newLength);
        _file.Flush();
        refs.FileLength = newLength;
        refs.Resize(ClustersFor(newLength));
        return (long)(offset >> _clusterBits) < refs.Length;
    }

    // ------------------------------------------------------------------ compare

    private void CompareAll(bool fixLeaks, bool fixErrors)
    {
        CompareRefcounts(_primary, fixLeaks, fixErrors);
        if (_hdd is not null)
        {
            CompareRefcounts(_hdd, fixLeaks, fixErrors);
        }
    }

    /// <summary>compare_refcounts: the on-disk refcount of every cluster against the references counted.</summary>
    private void CompareRefcounts(RefcountSpace space, bool fixLeaks, bool fixErrors)
    {
        var refs = space.Refs;
        var onDiskCounts = space.OnDisk;
        var label = space.Label;
        long highest = 0;
        var changed = false;
        for (long i = 0; i < refs.Length; i++)
        {
            if (!onDiskCounts.TryGet((ulong)i, out var onDisk, out var tableIndex, out var blockOffset))
            {
                SignalUnreadableBlock(label, tableIndex, blockOffset);
                Note($"Can't get refcount for {label}cluster {i}: Input/output error");
                _counters.CheckErrors++;
                continue;
            }
            ulong referenced = refs[i];
            if (onDisk > 0 || referenced > 0)
            {
                highest = i;
            }
            if (onDisk == referenced)
            {
                continue;
            }
            var fixLeak = false;
            var fixError = false;
            if (onDisk == 0)
            {
                // No refcount block can be trusted to hold it: only a new structure can.
                space.NeedsRebuild = true;
            }
            else if (onDisk > referenced && fixLeaks)
            {
                fixLeak = true;
            }
            else if (onDisk < referenced && fixErrors)
            {
                fixError = true;
            }
            var what = fixLeak || fixError ? "Repairing" : onDisk < referenced ? "ERROR" : "Leaked";
            Note($"{what} {label}cluster {i} refcount={onDisk} reference={referenced}");
            if (fixLeak || fixError)
            {
                onDiskCounts.Set((ulong)i, referenced);
                changed = true;
                if (fixLeak)
                {
                    _counters.LeaksFixed++;
                }
                else
                {
                    _counters.CorruptionsFixed++;
                }
                continue;
            }
            if (onDisk < referenced)
            {
                _counters.Corruptions++;
            }
            else
            {
                _counters.Leaks++;
            }
        }
        space.Highest = highest;
        if (changed)
        {
            // Durable before any COPIED flag is set on the strength of these counts.
            onDiskCounts.WriteBack();
            _file.Flush();
        }
    }

    private void SignalUnreadableBlock(string label, int tableIndex, ulong blockOffset)
    {
        if (_signaledUnreadableBlock || (blockOffset & (ulong)(_clusterSize - 1)) == 0)
        {
            // Only an unaligned block is a corruption QEMU signals; one out of reach is just a failed read.
            return;
        }
        _signaledUnreadableBlock = true;
        Note($"qcow2: Image is corrupt: {(label.Length == 0 ? "Refblock" : label + "refblock")} offset {Hex0x(blockOffset)} unaligned (reftable index: {Hex0x((ulong)tableIndex)}); further non-fatal corruption events will be suppressed");
    }

    // ------------------------------------------------------------------ OFLAG_COPIED

    /// <summary>check_oflag_copied: the active L1 and L2 entries carry COPIED exactly when the refcount is 1.</summary>
    private bool CheckOflagCopied()
    {
        bool repair;
        if (_fixErrors)
        {
            repair = true;
        }
        else if (_fixLeaks)
        {
            // Only when the refcounts are now known to be right.
            repair = _counters.CheckErrors == 0 && _counters.Corruptions == 0 && _counters.Leaks == 0;
        }
        else
        {
            repair = false;
        }
        var l1Offset = _header.L1TableOffset;
        var l1 = ReadTable((ulong)l1Offset, _header.L1Size);
        var l2 = new byte[_clusterSize];
        Span<byte> entryBytes = stackalloc byte[8];
        var wrote = false;
        for (var i = 0; i < l1.Length; i++)
        {
            var l1Entry = l1[i];
            var l2Offset = l1Entry & OffsetMask;
            if (l2Offset == 0)
            {
                continue;
            }
            if (!_primary.OnDisk.TryGet(l2Offset >> _clusterBits, out var refcount, out _, out _))
            {
                continue;
            }
            if ((refcount == 1) != ((l1Entry & ClusterLayout.Copied) != 0))
            {
                _counters.Corruptions++;
                Note($"{(repair ? "Repairing" : "ERROR")} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1Entry:x} refcount={refcount}");
                if (repair)
                {
                    var fixedEntry = refcount == 1 ? l1Entry | ClusterLayout.Copied : l1Entry & ~ClusterLayout.Copied;
                    BinaryPrimitives.WriteUInt64BigEndian(entryBytes, fixedEntry);
                    _file.Write(l1Offset + i * 8L, entryBytes);
                    wrote = true;
                    _counters.Corruptions--;
                    _counters.CorruptionsFixed++;
                }
            }

            CheckIo.ReadZeroPadded(_file, l2Offset, l2);
            var changes = new List<int>();
            for (var j = 0; j < _l2Entries; j++)
            {
                var entry = BinaryPrimitives.ReadUInt64BigEndian(l2.AsSpan(j * _entryBytes));
                var type = Classify(entry);
                if (type is not (EntryType.Normal or EntryType.ZeroAllocated))
                {
                    continue;
                }
                var dataOffset = entry & OffsetMask;
                if (ExternalData || !SpaceOf(entry, type).OnDisk.TryGet(dataOffset >> _clusterBits, out refcount, out _, out _))
                {
                    continue;
                }
                if ((refcount == 1) != ((entry & ClusterLayout.Copied) != 0))
                {
                    _counters.Corruptions++;
                    Note($"{(repair ? "Repairing" : "ERROR")} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}");
                    if (repair)
                    {
                        BinaryPrimitives.WriteUInt64BigEndian(l2.AsSpan(j * _entryBytes), refcount == 1 ? entry | ClusterLayout.Copied : entry & ~ClusterLayout.Copied);
                        changes.Add(j);
                    }
                }
            }
            if (changes.Count > 0)
            {
                if ((l2Offset & (ulong)(_clusterSize - 1)) != 0)
                {
                    Note("ERROR: L2 table offset unaligned; its OFLAG_COPIED flags are not repaired");
                    continue;
                }
                if (OverlapsMetadata((long)l2Offset, _clusterSize, allowActiveL2: true) || (long)l2Offset + _clusterSize > _file.Length)
                {
                    Note("ERROR: Could not write L2 table; metadata overlap check failed: Input/output error");
                    _counters.CheckErrors++;
                    if (wrote)
                    {
                        _file.Flush();
                    }
                    return false;
                }
                // Entry by entry: each write is a single aligned 8-byte change that stands on its own.
                foreach (var j in changes)
                {
                    _file.Write((long)l2Offset + j * (long)_entryBytes, l2.AsSpan(j * _entryBytes, 8));
                }
                wrote = true;
                _counters.Corruptions -= changes.Count;
                _counters.CorruptionsFixed += changes.Count;
            }
        }
        if (wrote)
        {
            _file.Flush();
        }
        return true;
    }

    // ------------------------------------------------------------------ metadata overlap

    /// <summary>
    /// Whether [offset, offset + length) touches metadata a repair must never write into (QEMU's overlap
    /// check): the header, the active L1 table, the refcount table and blocks, the snapshot table, the
    /// snapshots' L1 tables, the bitmap directory and, unless allowed, active L2 tables.
    /// </summary>
    private bool OverlapsMetadata(long offset, long length, bool allowActiveL2)
    {
        _metadata ??= CollectMetadata();
        var start = offset & ~(long)(_clusterSize - 1);
        var end = (offset + length + _clusterSize - 1) & ~(long)(_clusterSize - 1);
        foreach (var (s, e, activeL2) in _metadata)
        {
            if (activeL2 && allowActiveL2)
            {
                continue;
            }
            if (s < end && start < e)
            {
                return true;
            }
        }
        return false;
    }

    private List<(long Start, long End, bool ActiveL2)> CollectMetadata()
    {
        var list = new List<(long, long, bool)>();
        void AddRange(ulong offset, long length, bool activeL2 = false)
        {
            if (length <= 0 || offset > long.MaxValue - (ulong)length)
            {
                return;
            }
            var s = (long)offset & ~(long)(_clusterSize - 1);
            list.Add((s, (long)offset + length, activeL2));
        }
        AddRange(0, _clusterSize);
        AddRange((ulong)_header.L1TableOffset, _header.L1Size * 8L);
        AddRange((ulong)_header.RefcountTableOffset, (long)_header.RefcountTableClusters * _clusterSize);
        foreach (var space in new[] { _primary, _hdd })
        {
            for (var i = 0; space is not null && i < space.OnDisk.TableEntries; i++)
            {
                var off = space.OnDisk.Entry(i) & OnDiskRefcounts.OffsetMask;
                if (off != 0)
                {
                    AddRange(off, _clusterSize);
                }
            }
        }
        if (_tier is not null)
        {
            AddRange((ulong)_tier.HddRefcountTableOffset, (long)_tier.HddRefcountTableClusters * _clusterSize);
            AddRange((ulong)_tier.HintsOffset, (long)_tier.HintsCount * TierExtension.HintEntrySize);
        }
        AddRange((ulong)_header.SnapshotsOffset, _snapshotsSize);
        foreach (var sn in _snapshots)
        {
            AddRange(sn.L1TableOffset, sn.L1Size * 8L);
        }
        if (_bitmaps is not null)
        {
            AddRange(_bitmaps.DirectoryOffset, (long)_bitmaps.DirectorySize);
        }
        foreach (var e in ReadTable((ulong)_header.L1TableOffset, _header.L1Size))
        {
            var off = e & OffsetMask;
            if (off != 0)
            {
                AddRange(off, _clusterSize, activeL2: true);
            }
        }
        return list;
    }

    // ------------------------------------------------------------------ rebuild

    /// <summary>
    /// Writes a whole new refcount structure from the counted references (rebuild_refcount_structure).
    /// Everything new goes past the end of the file, so the old structure stays intact until the
    /// header switches over; the blocks and table are flushed before that single header write, which
    /// is flushed too. The old structure is then merely leaked. When the HDD data file's refcounts
    /// need rebuilding, its new structure is placed first and the primary's is rebuilt after it, to
    /// count it; the primary switches first, so a cut between the two switches leaks the new HDD
    /// structure rather than losing the old one.
    /// </summary>
    private bool RebuildRefcountStructures()
    {
        Note("Rebuilding refcount structure");
        var order = _header.RefcountOrder;
        var start = Math.Max(_primary.Refs.Length, ClustersFor(_file.Length));
        RefcountRebuildPlan? hddPlan = null;
        if (_hdd is { NeedsRebuild: true })
        {
            hddPlan = RefcountRebuildPlan.Create(_hdd.Refs, start, selfDescribing: false, _clusterBits, order);
            if (hddPlan is null)
            {
                return RebuildTooLarge();
            }
            hddPlan.MarkAllocated(_primary.Refs);
            start += hddPlan.Clusters;
        }
        var plan = RefcountRebuildPlan.Create(_primary.Refs, start, selfDescribing: true, _clusterBits, order);
        if (plan is null)
        {
            return RebuildTooLarge();
        }
        plan.MarkAllocated(_primary.Refs);
        if (hddPlan is not null)
        {
            hddPlan.Write(_file, _hdd!.Refs, order);
        }
        plan.Write(_file, _primary.Refs, order);
        _file.Flush();

        Span<byte> pointer = stackalloc byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(pointer, (ulong)plan.TableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(pointer[8..], (uint)plan.TableClusters);
        _file.Write(QcowHeader.OffsetRefcountTableOffset, pointer);
        _file.Flush();
        _header.RefcountTableOffset = plan.TableOffset;
        _header.RefcountTableClusters = (uint)plan.TableClusters;

        if (hddPlan is not null)
        {
            BinaryPrimitives.WriteUInt64BigEndian(pointer, (ulong)hddPlan.TableOffset);
            BinaryPrimitives.WriteUInt32BigEndian(pointer[8..], (uint)hddPlan.TableClusters);
            var ext = _tierExtension!;
            _file.Write(ext.Offset + 8 + TierExtension.OffsetHddRefcountTableOffset, pointer);
            _file.Flush();
            // The header object's copy of the extension must say what the disk says, for the re-check.
            pointer.CopyTo(ext.Data.AsSpan(TierExtension.OffsetHddRefcountTableOffset));
            _tier!.HddRefcountTableOffset = hddPlan.TableOffset;
            _tier.HddRefcountTableClusters = (uint)hddPlan.TableClusters;
        }
        return true;
    }

    private bool RebuildTooLarge()
    {
        Note("ERROR allocating reftable: the refcount table would exceed the maximum size supported by QEMU");
        _counters.CheckErrors++;
        return false;
    }
}
