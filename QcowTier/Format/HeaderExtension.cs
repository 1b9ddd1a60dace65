namespace QcowTier.Format;

/// <summary>One header extension (type, length, data padded to 8 bytes), found by its type, never by position.</summary>
internal sealed record HeaderExtension(uint Type, byte[] Data, long Offset)
{
    public const uint EndMarker = 0;
    public const uint BackingFormat = 0xe2792aca;
    public const uint FeatureNameTable = 0x6803f857;
    public const uint Bitmaps = 0x23852875;
    public const uint FullDiskEncryption = 0x0537be77;
    public const uint ExternalDataFile = 0x44415441;

    /// <summary>QEMU's own feature name table for the features it writes, so a reader can name them.</summary>
    public static byte[] QemuFeatureNameTable()
    {
        (byte Type, byte Bit, string Name)[] entries =
        [
            (0, 0, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ];
        var data = new byte[entries.Length * 48];
        for (var i = 0; i < entries.Length; i++)
        {
            data[i * 48] = entries[i].Type;
            data[i * 48 + 1] = entries[i].Bit;
            System.Text.Encoding.ASCII.GetBytes(entries[i].Name, data.AsSpan(i * 48 + 2, 46));
        }
        return data;
    }
}
