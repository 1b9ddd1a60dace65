using System.Buffers.Binary;
using CsCheck;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Heat;

/// <summary>Persistent dirty bitmaps of images made by qemu-img and written by qemu-io, imported; and damaged.</summary>
public sealed class DirtyBitmapImportTests : IDisposable
{
    private const long DiskSize = 16 << 20;
    private readonly TempDir _dir = new();
    private readonly string _image;

    public DirtyBitmapImportTests()
    {
        _image = _dir.File("b.qcow2");
        Qemu.Img("create", "-f", "qcow2", _image, "16M").EnsureSuccess();
        Qemu.Img("bitmap", "--add", "-g", "64K", _image, "fine").EnsureSuccess();
        Qemu.Img("bitmap", "--add", "-g", "512K", _image, "coarse").EnsureSuccess();
        Qemu.Io("-f", "qcow2", "-c", "write 0 4k", "-c", "write 1M 128k", "-c", "write 15M 4k", _image).EnsureSuccess();
    }

    public void Dispose() => _dir.Dispose();

    private static HeatMap Map() => new(DiskSize, 65536);

    [Fact]
    public void The_busiest_bitmap_is_imported_one_write_per_dirty_granule()
    {
        var map = Map();
        var r = HeatImport.ImportFile(_image, HeatTraceFormat.QemuDirtyBitmap, map, new HeatImportOptions { TraceStart = HeatTestKit.T0 });

        r.Backends.Should().Equal(new HeatTraceBackend("fine", 0, 4, true), new HeatTraceBackend("coarse", 0, 3, false));
        r.ImportedBackend.Should().Be("fine");
        r.IosImported.Should().Be(4);
        r.WritesImported.Should().Be(4);
        r.ReadsImported.Should().Be(0);
        r.Warnings.Should().BeEmpty();
        map.TouchedUnits().Select(u => (u.Start, u.Writes, u.Reads)).Should().Equal(
            (0L, 1L, 0L), (16L << 16, 1L, 0L), (17L << 16, 1L, 0L), (240L << 16, 1L, 0L));
        map.WindowStart.Should().Be(HeatTestKit.T0);
    }

    [Fact]
    public void A_named_bitmap_with_coarse_granules_heats_every_unit_it_covers()
    {
        var map = Map();
        var r = HeatImport.ImportFile(_image, HeatTraceFormat.QemuDirtyBitmap, map, new HeatImportOptions { BitmapName = "coarse" });
        r.ImportedBackend.Should().Be("coarse");
        r.IosImported.Should().Be(3);
        var expected = new[] { 0, 16, 240 }.SelectMany(first => Enumerable.Range(first, 8)).Select(u => (long)u << 16);
        map.TouchedUnits().Select(u => u.Start).Should().Equal(expected, "a 512 KiB granule spans eight 64 KiB units");
        map.TouchedUnits().Should().OnlyContain(u => u.Writes == 1);
    }

    [Fact]
    public void An_unknown_bitmap_name_lists_the_ones_there()
    {
        var act = () => HeatImport.ImportFile(_image, HeatTraceFormat.QemuDirtyBitmap, Map(), new HeatImportOptions { BitmapName = "nope" });
        act.Should().Throw<ArgumentException>().WithMessage("*\"fine\", \"coarse\"*");
    }

    [Fact]
    public void A_bitmap_in_use_is_skipped_unless_named()
    {
        var bytes = File.ReadAllBytes(_image);
        var (_, entries) = Layout(bytes);
        var fine = entries.Single(e => e.Name == "fine");
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan((int)fine.EntryOffset + 12), BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan((int)fine.EntryOffset + 12)) | 1);

        var map = Map();
        var r = HeatImport.Import(new MemoryStream(bytes), HeatTraceFormat.QemuDirtyBitmap, map);
        r.ImportedBackend.Should().Be("coarse");
        r.Warnings.Should().ContainSingle().Which.Should().Contain("\"fine\"").And.Contain("in use");

        var named = Map();
        var rn = HeatImport.Import(new MemoryStream(bytes), HeatTraceFormat.QemuDirtyBitmap, named, new HeatImportOptions { BitmapName = "fine" });
        rn.IosImported.Should().Be(4);
        rn.Warnings.Should().ContainSingle().Which.Should().Contain("out of date");
    }

    [Fact]
    public void Stale_bitmaps_and_images_without_bitmaps_import_nothing_and_say_why()
    {
        var bytes = File.ReadAllBytes(_image);
        bytes[95] &= 0xfe; // autoclear bit 0: a writer that does not know bitmaps touched the image
        var r = HeatImport.Import(new MemoryStream(bytes), HeatTraceFormat.QemuDirtyBitmap, Map());
        r.IosImported.Should().Be(0);
        r.Warnings.Should().ContainSingle().Which.Should().Contain("stale");

        var plain = _dir.File("plain.qcow2");
        Qemu.Img("create", "-f", "qcow2", plain, "16M").EnsureSuccess();
        var rp = HeatImport.ImportFile(plain, HeatTraceFormat.QemuDirtyBitmap, Map());
        rp.Backends.Should().BeEmpty();
        rp.Warnings.Should().ContainSingle().Which.Should().Contain("no persistent dirty bitmaps");

        var v2 = _dir.File("v2.qcow2");
        Qemu.Img("create", "-f", "qcow2", "-o", "compat=0.10", v2, "16M").EnsureSuccess();
        HeatImport.ImportFile(v2, HeatTraceFormat.QemuDirtyBitmap, Map()).Warnings.Should().ContainSingle().Which.Should().Contain("version 2");
    }

    public static TheoryData<string, string> Damage() => new()
    {
        { "magic", "magic" },
        { "cluster_bits", "cluster_bits" },
        { "directory size", "bitmap_directory_size" },
        { "directory offset", "bitmap_directory_offset" },
        { "nb_bitmaps", "nb_bitmaps" },
        { "table size", "bitmap_table_size" },
        { "table offset", "bitmap_table_offset" },
        { "table entry", "bitmap table entry" },
        { "flags", "flags" },
        { "name size", "name_size" },
        { "data beyond the end", "bitmap data" },
    };

    [Theory]
    [MemberData(nameof(Damage))]
    public void Damaged_bitmap_structures_raise_typed_errors_naming_the_field(string damage, string field)
    {
        var bytes = File.ReadAllBytes(_image);
        var (ext, entries) = Layout(bytes);
        var fine = (int)entries[0].EntryOffset;
        var table = (int)entries[0].TableOffset;
        switch (damage)
        {
            case "magic": bytes[0] = (byte)'X'; break;
            case "cluster_bits": BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(20), 40); break;
            case "directory size": BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(ext + 8), 1UL << 40); break;
            case "directory offset": BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(ext + 16), 1UL << 50); break;
            case "nb_bitmaps": BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(ext), 70000); break;
            case "table size": BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(fine + 8), 0x7fffffff); break;
            case "table offset": BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(fine), (ulong)bytes.Length + 65536); break;
            case "table entry": bytes[table + 7] |= 0x02; break;
            case "flags": bytes[fine + 12] = 0x80; break;
            case "name size": BinaryPrimitives.WriteUInt16BigEndian(bytes.AsSpan(fine + 18), 0); break;
            case "data beyond the end":
                BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(table), (ulong)(bytes.Length + 65536) & ~0xffffUL);
                break;
        }
        var act = () => HeatImport.Import(new MemoryStream(bytes), HeatTraceFormat.QemuDirtyBitmap, Map());
        var ex = act.Should().Throw<QcowFormatException>().Which;
        ex.Field.Should().Be(field);
        ex.Offset.Should().BeGreaterThanOrEqualTo(0);
    }

    [Fact]
    public void A_table_that_reads_one_cluster_over_and_over_is_refused()
    {
        // A 1 TiB disk at 512-byte granularity needs 4096 bitmap clusters of 64 KiB: point all of them at
        // the one data cluster. Each is legal alone; together they would read 256 MiB out of a 1 MiB file.
        var bytes = File.ReadAllBytes(_image);
        var (_, entries) = Layout(bytes);
        BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(24), 1UL << 40);
        var fine = (int)entries[0].EntryOffset;
        var table = (int)entries[0].TableOffset;
        bytes[fine + 17] = 9;
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(fine + 8), 4096);
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan((int)entries[1].EntryOffset + 8), 4);
        var data = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(table));
        if (bytes.Length < table + 4096 * 8)
        {
            Array.Resize(ref bytes, table + 4096 * 8);
        }
        for (var i = 0; i < 4096; i++)
        {
            BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(table + i * 8), data);
        }
        var act = () => HeatImport.Import(new MemoryStream(bytes), HeatTraceFormat.QemuDirtyBitmap, new HeatMap(1L << 40, 65536));
        act.Should().Throw<QcowCorruptImageException>().WithMessage("*more than the file*").Which.Field.Should().Be("bitmap table entry");
    }

    [Fact]
    public void Random_damage_to_the_metadata_never_escapes_as_anything_but_a_format_error()
    {
        var original = File.ReadAllBytes(_image);
        var (ext, entries) = Layout(original);
        var dataCluster = (int)(BinaryPrimitives.ReadUInt64BigEndian(original.AsSpan((int)entries[0].TableOffset)) & 0x00fffffffffffe00UL);
        (int Start, int Length)[] regions =
        [
            (0, 112),                           // the header
            (ext - 8, 32),                      // the bitmaps extension
            ((int)entries[0].EntryOffset, 64),  // the directory
            ((int)entries[0].TableOffset, 8),
            ((int)entries[1].TableOffset, 8),
            (dataCluster, 32),
        ];
        Gen.Select(Gen.Int[0, regions.Length - 1].Array[1, 8], Gen.Int[0, 511].Array[8], Gen.Byte.Array[8]).Sample((region, at, value) =>
        {
            var bytes = (byte[])original.Clone();
            for (var i = 0; i < region.Length; i++)
            {
                var (start, length) = regions[region[i]];
                bytes[start + at[i] % length] = value[i];
            }
            try
            {
                var map = Map();
                var r = HeatImport.Import(new MemoryStream(bytes), HeatTraceFormat.QemuDirtyBitmap, map);
                map.TotalWrites.Should().Be(r.WritesImported);
            }
            catch (QcowFormatException)
            {
            }
        }, iter: 400, threads: 1);
    }

    private sealed record Entry(string Name, long EntryOffset, long TableOffset);

    /// <summary>Where the bitmaps extension's data and the directory entries are, read independently of the importer.</summary>
    private static (int Extension, List<Entry> Entries) Layout(byte[] bytes)
    {
        var pos = (int)BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(100));
        while (BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(pos)) != 0x23852875)
        {
            pos += 8 + (int)((BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(pos + 4)) + 7) & ~7u);
        }
        var ext = pos + 8;
        var count = BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(ext));
        var dir = (int)BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(ext + 16));
        var list = new List<Entry>();
        for (var i = 0; i < count; i++)
        {
            var nameSize = BinaryPrimitives.ReadUInt16BigEndian(bytes.AsSpan(dir + 18));
            var extra = (int)BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(dir + 20));
            var name = System.Text.Encoding.UTF8.GetString(bytes, dir + 24 + extra, nameSize);
            list.Add(new Entry(name, dir, (long)BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(dir))));
            dir += (24 + nameSize + extra + 7) & ~7;
        }
        return (ext, list);
    }
}
