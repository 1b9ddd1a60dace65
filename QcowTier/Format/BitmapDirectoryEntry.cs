using System.Buffers.Binary;
using System.Text;
using QcowTier.Check;
using QcowTier.Storage;

namespace QcowTier.Format;

/// <summary>
/// One entry of the bitmap directory (docs/interop/qcow2.txt, "Bitmap directory"), complete: the
/// checker's <see cref="BitmapDirectory"/> validates the extension and counts clusters; the engine
/// needs the flags, the granularity and the extra data too, to write the directory back.
/// </summary>
internal sealed class BitmapDirectoryEntry
{
    private const int OffsetTableOffset = 0;
    private const int OffsetTableSize = 8;
    private const int OffsetFlags = 12;
    private const int OffsetType = 16;
    private const int OffsetGranularityBits = 17;
    private const int OffsetNameSize = 18;
    private const int OffsetExtraDataSize = 20;
    private const int HeaderSize = 24;

    /// <summary>The bitmap was (or is being) changed without its stored data following: not to be trusted.</summary>
    public const uint FlagInUse = 1;
    /// <summary>The bitmap tracks every write (QEMU: an enabled bitmap).</summary>
    public const uint FlagAuto = 2;
    /// <summary>Unknown extra data may be kept when the bitmap is rewritten.</summary>
    public const uint FlagExtraDataCompatible = 4;
    public const byte TypeDirtyTracking = 1;

    /// <summary>Bitmap table entry: bits 9-55 hold the data cluster's offset.</summary>
    public const ulong TableOffsetMask = 0x00fffffffffffe00UL;
    /// <summary>Bitmap table entry without a cluster: bit 0 set means "all ones".</summary>
    public const ulong TableAllOnes = 1;

    /// <summary>Extension data: nb_bitmaps, reserved, bitmap_directory_size, bitmap_directory_offset.</summary>
    public const int ExtensionSize = 24;

    public long TableOffset { get; set; }
    public uint TableSize { get; set; }
    public uint Flags { get; set; }
    public byte Type { get; set; } = TypeDirtyTracking;
    public int GranularityBits { get; set; }
    public string Name { get; set; } = "";
    public byte[] Extra { get; set; } = [];

    /// <summary>Where this entry starts inside the directory (for in-place flag updates).</summary>
    public int DirectoryPosition { get; set; }

    public bool InUse => (Flags & FlagInUse) != 0;

    public bool Auto => (Flags & FlagAuto) != 0;

    public long Granularity => 1L << GranularityBits;

    public static int FlagsPosition(BitmapDirectoryEntry e) => e.DirectoryPosition + OffsetFlags;

    /// <summary>Parses the directory the (validated) extension points at; throws naming the entry when it cannot be used.</summary>
    public static List<BitmapDirectoryEntry> Read(ImageStorage file, BitmapsExtension ext)
    {
        if (ext.DirectorySize == 0 || ext.DirectoryOffset + ext.DirectorySize > (ulong)file.Length)
        {
            ThrowHelper.Corrupt(file.Name, (long)ext.DirectoryOffset, "bitmap_directory_offset", "the bitmap directory lies past the end of the file");
        }
        var dir = new byte[ext.DirectorySize];
        file.Read((long)ext.DirectoryOffset, dir);
        var list = new List<BitmapDirectoryEntry>();
        var pos = 0;
        while (pos < dir.Length)
        {
            if (pos + HeaderSize > dir.Length)
            {
                ThrowHelper.Corrupt(file.Name, (long)ext.DirectoryOffset + pos, "bitmap directory", "truncated bitmap directory entry");
            }
            var e = dir.AsSpan(pos);
            var nameSize = BinaryPrimitives.ReadUInt16BigEndian(e[OffsetNameSize..]);
            var extraSize = BinaryPrimitives.ReadUInt32BigEndian(e[OffsetExtraDataSize..]);
            var size = ((long)HeaderSize + extraSize + nameSize + 7) & ~7L;
            if (pos + size > dir.Length)
            {
                ThrowHelper.Corrupt(file.Name, (long)ext.DirectoryOffset + pos, "bitmap directory", "bitmap directory entry past the directory's end");
            }
            list.Add(new BitmapDirectoryEntry
            {
                TableOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(e[OffsetTableOffset..]),
                TableSize = BinaryPrimitives.ReadUInt32BigEndian(e[OffsetTableSize..]),
                Flags = BinaryPrimitives.ReadUInt32BigEndian(e[OffsetFlags..]),
                Type = e[OffsetType],
                GranularityBits = e[OffsetGranularityBits],
                Extra = e.Slice(HeaderSize, (int)extraSize).ToArray(),
                Name = Encoding.UTF8.GetString(e.Slice(HeaderSize + (int)extraSize, nameSize)),
                DirectoryPosition = pos,
            });
            pos += (int)size;
        }
        if (list.Count != ext.Count)
        {
            ThrowHelper.Corrupt(file.Name, (long)ext.DirectoryOffset, "nb_bitmaps", $"the bitmap directory holds {list.Count} entries, the extension says {ext.Count}");
        }
        return list;
    }

    /// <summary>The directory's bytes; sets each entry's <see cref="DirectoryPosition"/>.</summary>
    public static byte[] Serialize(List<BitmapDirectoryEntry> list)
    {
        var size = 0L;
        foreach (var b in list)
        {
            size += (HeaderSize + b.Extra.Length + Encoding.UTF8.GetByteCount(b.Name) + 7) & ~7;
        }
        var dir = new byte[size];
        var pos = 0;
        foreach (var b in list)
        {
            var name = Encoding.UTF8.GetBytes(b.Name);
            var e = dir.AsSpan(pos);
            BinaryPrimitives.WriteUInt64BigEndian(e[OffsetTableOffset..], (ulong)b.TableOffset);
            BinaryPrimitives.WriteUInt32BigEndian(e[OffsetTableSize..], b.TableSize);
            BinaryPrimitives.WriteUInt32BigEndian(e[OffsetFlags..], b.Flags);
            e[OffsetType] = b.Type;
            e[OffsetGranularityBits] = (byte)b.GranularityBits;
            BinaryPrimitives.WriteUInt16BigEndian(e[OffsetNameSize..], (ushort)name.Length);
            BinaryPrimitives.WriteUInt32BigEndian(e[OffsetExtraDataSize..], (uint)b.Extra.Length);
            b.Extra.CopyTo(e[HeaderSize..]);
            name.CopyTo(e[(HeaderSize + b.Extra.Length)..]);
            b.DirectoryPosition = pos;
            pos += (HeaderSize + b.Extra.Length + name.Length + 7) & ~7;
        }
        return dir;
    }

    /// <summary>The extension's 24 bytes of data.</summary>
    public static byte[] ExtensionData(int count, long directoryOffset, long directorySize)
    {
        var d = new byte[ExtensionSize];
        BinaryPrimitives.WriteUInt32BigEndian(d, (uint)count);
        BinaryPrimitives.WriteUInt64BigEndian(d.AsSpan(8), (ulong)directorySize);
        BinaryPrimitives.WriteUInt64BigEndian(d.AsSpan(16), (ulong)directoryOffset);
        return d;
    }
}
