using System.Buffers.Binary;
using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Check;

/// <summary>The bitmaps header extension (docs/interop/qcow2.txt, "Bitmaps extension").</summary>
internal sealed record BitmapsExtension(uint Count, ulong DirectoryOffset, ulong DirectorySize);

/// <summary>One bitmap directory entry, as far as its clusters are concerned.</summary>
internal sealed record BitmapEntry(string Name, ulong TableOffset, uint TableSize);

/// <summary>Reads and validates persistent dirty bitmaps the way QEMU does before counting their clusters.</summary>
internal static class BitmapDirectory
{
    /// <summary>QEMU's QCOW2_MAX_BITMAPS.</summary>
    public const uint MaxBitmaps = 65535;
    /// <summary>QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE.</summary>
    public const ulong MaxDirectorySize = 1024UL * MaxBitmaps;

    private const int DirEntryHeaderSize = 24;
    private const uint MaxTableSize = 0x8000000;
    private const ulong MaxPhysSize = 0x20000000;
    private const int MinGranularityBits = 9;
    private const int MaxGranularityBits = 31;
    private const int MaxNameSize = 1023;
    private const uint ReservedFlags = 0xfffffffcU;
    private const uint FlagInUse = 1;
    private const byte DirtyTrackingBitmap = 1;
    private const ulong TableEntryReservedMask = 0xff000000000001feUL;
    private const ulong TableEntryOffsetMask = 0x00fffffffffffe00UL;
    private const ulong TableEntryAllOnes = 1;

    /// <summary>
    /// The extension when QEMU would use it: present and autoclear bit 0 set. Otherwise the bitmaps may
    /// have been invalidated by a writer that does not know them, and their clusters count as leaked.
    /// </summary>
    public static BitmapsExtension? Find(QcowHeader header, out string? error)
    {
        error = null;
        if ((header.AutoclearFeatures & QcowHeader.AutoclearBitmaps) == 0)
        {
            return null;
        }
        var ext = header.Extensions.FirstOrDefault(e => e.Type == HeaderExtension.Bitmaps);
        if (ext is null)
        {
            return null;
        }
        var d = ext.Data;
        if (d.Length != 24)
        {
            error = "bitmaps_ext: Invalid extension length";
            return null;
        }
        var count = BinaryPrimitives.ReadUInt32BigEndian(d);
        var reserved = BinaryPrimitives.ReadUInt32BigEndian(d.AsSpan(4));
        var size = BinaryPrimitives.ReadUInt64BigEndian(d.AsSpan(8));
        var offset = BinaryPrimitives.ReadUInt64BigEndian(d.AsSpan(16));
        if (reserved != 0)
        {
            error = "bitmaps_ext: Reserved field is not zero";
        }
        else if (count > MaxBitmaps)
        {
            error = $"bitmaps_ext: Image has {count} bitmaps, exceeding the QEMU supported maximum of {MaxBitmaps}";
        }
        else if (count == 0)
        {
            error = "found bitmaps extension with zero bitmaps";
        }
        else if ((offset & (ulong)(header.ClusterSize - 1)) != 0)
        {
            error = "bitmaps_ext: invalid bitmap directory offset";
        }
        else if (size > MaxDirectorySize)
        {
            error = $"bitmaps_ext: bitmap directory size ({size}) exceeds the maximum supported size ({MaxDirectorySize})";
        }
        return error is null ? new BitmapsExtension(count, offset, size) : null;
    }

    /// <summary>Parses the directory; null when it breaks a rule QEMU enforces (bitmap_list_load).</summary>
    public static List<BitmapEntry>? Load(ImageStorage file, QcowHeader header, BitmapsExtension ext)
    {
        if (ext.DirectorySize == 0 || ext.DirectorySize > (ulong)file.Length)
        {
            // A directory larger than the file would be mostly zeroes, which no valid entry is.
            return null;
        }
        var dir = new byte[ext.DirectorySize];
        CheckIo.ReadZeroPadded(file, ext.DirectoryOffset, dir);
        var list = new List<BitmapEntry>();
        var pos = 0;
        while (pos < dir.Length)
        {
            if (pos + DirEntryHeaderSize > dir.Length || list.Count >= ext.Count)
            {
                return null;
            }
            var e = dir.AsSpan(pos);
            var tableOffset = BinaryPrimitives.ReadUInt64BigEndian(e);
            var tableSize = BinaryPrimitives.ReadUInt32BigEndian(e[8..]);
            var flags = BinaryPrimitives.ReadUInt32BigEndian(e[12..]);
            var type = e[16];
            var granularityBits = e[17];
            var nameSize = BinaryPrimitives.ReadUInt16BigEndian(e[18..]);
            var extraSize = BinaryPrimitives.ReadUInt32BigEndian(e[20..]);
            var entrySize = ((long)DirEntryHeaderSize + nameSize + extraSize + 7) & ~7L;
            if (pos + entrySize > dir.Length || extraSize != 0)
            {
                return null;
            }
            if (!EntryIsValid(header, tableOffset, tableSize, flags, type, granularityBits, nameSize))
            {
                return null;
            }
            var name = System.Text.Encoding.UTF8.GetString(dir, pos + DirEntryHeaderSize, nameSize);
            list.Add(new BitmapEntry(name, tableOffset, tableSize));
            pos += (int)entrySize;
        }
        return list.Count == ext.Count ? list : null;
    }

    /// <summary>The data cluster offsets of one bitmap table; null when an entry breaks the format's rules.</summary>
    public static List<ulong>? LoadTable(ImageStorage file, QcowHeader header, BitmapEntry bitmap)
    {
        // EntryIsValid bounded the table to 512 MiB of bitmap, i.e. at most 8 MiB of table.
        var raw = new byte[(long)bitmap.TableSize * 8];
        CheckIo.ReadZeroPadded(file, bitmap.TableOffset, raw);
        var offsets = new List<ulong>();
        for (var i = 0; i < bitmap.TableSize; i++)
        {
            var entry = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
            if ((entry & TableEntryReservedMask) != 0)
            {
                return null;
            }
            var offset = entry & TableEntryOffsetMask;
            if (offset != 0)
            {
                if ((entry & TableEntryAllOnes) != 0 || offset % (ulong)header.ClusterSize != 0)
                {
                    return null;
                }
                offsets.Add(offset);
            }
        }
        return offsets;
    }

    private static bool EntryIsValid(QcowHeader header, ulong tableOffset, uint tableSize, uint flags, byte type, byte granularityBits, int nameSize)
    {
        var cs = (ulong)header.ClusterSize;
        if (tableSize == 0 || tableOffset == 0 || tableOffset % cs != 0 || tableSize > MaxTableSize
            || granularityBits > MaxGranularityBits || granularityBits < MinGranularityBits
            || (flags & ReservedFlags) != 0 || nameSize > MaxNameSize || type != DirtyTrackingBitmap)
        {
            return false;
        }
        var physBytes = tableSize * cs;
        if (physBytes > MaxPhysSize)
        {
            return false;
        }
        // A bitmap that is not in use must be large enough to cover the whole disk.
        return (flags & FlagInUse) != 0 || (ulong)header.Size <= (physBytes * 8) << granularityBits;
    }
}
